"""Uses of libraries' private APIs, one module per library, each naming the version it was
written for; a guard test fails when that version changes."""
