"""Untrusted text made safe for a terminal: file names, document text, library messages.

A file name may hold a newline (a fake ``skipped ...`` or summary line), an ANSI escape
sequence (colours, cursor moves, a rewritten title bar) or a bidirectional override (a name
that reads backwards). Everything the CLI prints that it did not write itself goes through
:func:`one_line` (a name, a reason, an error) or :func:`terminal_text` (an answer).
"""

from __future__ import annotations

import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Unicode categories that do not print as themselves: controls (C0, C1, DEL; ESC among them),
# format characters (bidirectional overrides, zero-width characters), line and paragraph
# separators, surrogates (undecodable bytes in a file name), private-use and unassigned
# code points.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_ZWJ = "\u200d"  # joins emoji sequences (a family, a flag): harmless, left as it is


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    return char != _ZWJ and unicodedata.category(char) in _UNSAFE_CATEGORIES


def one_line(text: str) -> str:
    """``text`` as one printable line: every control, format or separator character (the
    newline and ESC included) written as a Python-style escape such as ``\\n`` or ``\\x1b``."""
    if text.isprintable():  # the common case, in one C call
        return text
    return "".join(_escape(char) if _unsafe(char) else char for char in text)


def terminal_text(text: str) -> str:
    """``text`` (an answer, possibly many lines) with newlines and tabs kept and every other
    unsafe character escaped as :func:`one_line` does."""
    return "".join(char if char in "\n\t" or not _unsafe(char) else _escape(char) for char in text)
