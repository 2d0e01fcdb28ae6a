"""How a request to an OpenAI-compatible server failed, in words a user can act on.

Shared by the clients of the vLLM generation server (``llm.mode = "server"``) and of the
embedding server (``embedding.mode = "server"``): both use the official ``openai`` SDK,
whose exceptions wrap httpx's and the system's.
"""

from __future__ import annotations

import os
import re

import httpx
import openai

from rag_app.errors import first_line


def transport_error(
    exc: BaseException, where: str, tries: str, section: str, timeout: float
) -> str | None:
    """The message for a request that timed out, lost its connection or never connected
    (``section``: the settings section to name, e.g. ``llm``), else ``None``."""
    if isinstance(exc, openai.APITimeoutError):
        return (
            f"{where} did not answer within {timeout:g} s (after {tries}; raise "
            f"{section}.request_timeout, or check that the server is up and not overloaded)"
        )
    if isinstance(exc, openai.APIConnectionError) and dropped(exc):
        return (
            f"{where} dropped the connection before answering: {reason(exc)} (after "
            f"{tries}; check the server's log, and any proxy in front of it)"
        )
    if isinstance(exc, openai.APIConnectionError):
        return (
            f"cannot reach {where}: {reason(exc)} (after {tries}; start it, "
            f"or check {section}.api_base)"
        )
    return None


def reason(exc: BaseException) -> str:
    """Why a request failed, in a few words: the system error under the library's
    ("connection refused"), else the root cause's first line."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    errnos = [e.errno for e in chain if isinstance(e, OSError) and e.errno and e.errno > 0]
    if errnos:
        text = os.strerror(errnos[0])
    else:
        root = next((e for e in reversed(chain) if str(e).strip()), exc)
        text = re.sub(r"^\[Errno -?\d+\]\s*", "", first_line(root)).rstrip(".")
    return text[:1].lower() + text[1:]


def dropped(exc: openai.APIConnectionError) -> bool:
    """Whether the server was reached but the connection went away before the answer."""
    cause = exc.__cause__
    return isinstance(cause, httpx.HTTPError) and not isinstance(cause, httpx.ConnectError)


def server_message(exc: openai.APIStatusError) -> str:
    """The server's own message (vLLM: ``{"error": {"message": ...}}``), on one line."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        text = error.get("message") if isinstance(error, dict) else error
        if isinstance(text, str) and text.strip():
            return " ".join(text.split())
    return first_line(exc)
