"""Where rag_app relies on a library's private API: one module per library, each override
naming the version it was written for, each guarded by a test (``tests/test_compat_*.py``)
which fails when the upstream signature changes. Everything else uses public APIs."""
