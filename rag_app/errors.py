"""The one exception type the entry points turn into a one-line message, and redaction of
secrets (tokens, API keys, credentials in URIs) from anything shown to a user."""

from __future__ import annotations

import re

MASK = "**********"
# scheme://userinfo@host...: the userinfo (user, user:password or a token) is a secret.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret value so :func:`redact` masks it wherever it shows up in a message.
    Values shorter than 4 characters are not masked (they would mangle ordinary text)."""
    if len(value) >= 4:
        _secrets.add(value)


def redact_uri(uri: str) -> str:
    """``uri`` with any credentials before ``@`` masked: ``https://***@host:19530``."""
    return _URI_USERINFO.sub(r"\g<scheme>***@", uri)


def redact(text: str) -> str:
    """``text`` with URI credentials and every registered secret masked."""
    text = redact_uri(text)
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


class RagAppError(Exception):
    """A problem the user can fix: the message names it and the fix, on one line.

    Its text never shows a registered secret or the credentials in a URI, whatever the
    message was built from (library errors can echo a connection string)."""

    def __str__(self) -> str:
        return redact(super().__str__())


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors run to pages)."""
    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__
