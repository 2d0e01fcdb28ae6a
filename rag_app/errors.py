"""The one exception type the entry points turn into a one-line message."""


class RagAppError(Exception):
    """A problem the user can fix: the message names it and the fix, on one line."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
