"""The one exception type the entry points turn into a one-line message."""


class RagAppError(Exception):
    """A problem the user can fix: the message names it and the fix, on one line."""
