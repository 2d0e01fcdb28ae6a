"""The one exception type the entry points turn into a one-line message, and redaction of
secrets (tokens, API keys, credentials in URIs) from anything shown to a user."""

from __future__ import annotations

import logging
import re

from rag_app.display import one_line

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
    message was built from (library errors can echo a connection string), and is one line
    whatever it quotes (a file name with a newline, a library's multi-line message)."""

    def __str__(self) -> str:
        return one_line(redact(super().__str__()))


class RedactSecrets(logging.Filter):
    """A log handler's filter that masks every registered secret and URI credential in the
    records it passes, from any logger (a library logging its settings at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # a traceback can quote a secret too
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def redact_logs() -> None:
    """Mask secrets in everything the root logger's handlers write (idempotent)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (library errors run to pages)."""
    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__
