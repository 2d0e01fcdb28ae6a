"""A vLLM OpenAI-compatible server (``llm.mode = "server"``): ``OpenAILike`` against
``/v1/chat/completions``, where the server applies the chat template and streams tokens,
with failures turned into one-line errors."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Generator,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
)

from rag_app.compat.llama_index_openai import OpenAILikeClientRetries
from rag_app.components.openai_errors import reason, server_message, transport_error
from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line, redact_uri

log = logging.getLogger(__name__)

_R = TypeVar("_R", ChatResponse, CompletionResponse)
# What the openai client raises (APIError and its kinds), and what httpx raises while a
# streamed body is being read (the client does not wrap those).
_SERVER_FAULTS = (openai.APIError, httpx.HTTPError)
_RETRIED_STATUS = {408, 409, 429}  # and 5xx: the statuses the openai client retries


class VllmServerLLM(OpenAILikeClientRetries):
    """``OpenAILike`` against a vLLM server, whose failures raise a one-line
    :class:`RagAppError` naming the server and the fix, never the API key.

    Retries are the openai client's: a request that could not connect, timed out before
    the answer began, or got 408/409/429/5xx is sent again up to ``retries`` times, with
    exponential backoff (about 0.5 s, 1 s, 2 s ... at most 8 s, or the server's
    Retry-After); streams too, as long as none of the answer has arrived. LlamaIndex's
    own retry layer (``max_retries``) stays off: it would multiply the client's tries,
    log a warning for each, and does not cover streams. A stream that breaks after tokens
    arrived is not retried (the caller may have shown them): the error says so.
    """

    def server_error(self, exc: BaseException, tokens: int | None = None) -> RagAppError:
        """The one-line error for a failed request; ``tokens``: those a stream delivered."""
        where = f"the vLLM server at {redact_uri(self.api_base or '')}"
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        message = transport_error(exc, where, tries, "llm", self.timeout)
        if message is None:
            if isinstance(exc, openai.APIStatusError):
                status = exc.status_code
                retried = f", after {tries}" if status >= 500 or status in _RETRIED_STATUS else ""
                message = (
                    f"{where} answered HTTP {status}{retried}: {server_message(exc)} "
                    f"({_STATUS_HINTS.get(status, 'check the server log')})"
                )
            elif isinstance(exc, httpx.TimeoutException):  # a stream stalled
                message = (
                    f"{where} sent nothing for {self.timeout:g} s after {tokens or 0} tokens "
                    "(the answer so far is incomplete; ask again, or raise llm.request_timeout)"
                )
            elif isinstance(exc, openai.APIError):  # an error event inside the stream
                message = (
                    f"{where} stopped the stream after {tokens or 0} tokens: {reason(exc)} "
                    "(the answer so far is incomplete; check the server log and ask again)"
                )
            else:  # httpx.RemoteProtocolError, ReadError ...: the connection went away
                message = (
                    f"{where} closed the stream after {tokens or 0} tokens: {reason(exc)} "
                    "(the answer so far is incomplete; ask again once the server is back)"
                )
        key = self.api_key or ""
        if key and key != "EMPTY":
            message = message.replace(key, "***")
        return RagAppError(message)

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        try:
            yield
        except _SERVER_FAULTS as exc:
            raise self.server_error(exc) from exc

    def _guard(self, stream: Iterator[_R]) -> Generator[_R, None, None]:
        tokens = 0
        try:
            for chunk in stream:
                tokens += bool(chunk.delta)
                yield chunk
        except _SERVER_FAULTS as exc:
            raise self.server_error(exc, tokens) from exc
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()  # stopped early: drop the connection, vLLM aborts the request

    async def _aguard(self, stream: AsyncIterator[_R]) -> AsyncGenerator[_R, None]:
        tokens = 0
        try:
            async for chunk in stream:
                tokens += bool(chunk.delta)
                yield chunk
        except _SERVER_FAULTS as exc:
            raise self.server_error(exc, tokens) from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if callable(aclose):
                await aclose()

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        with self._faults():
            return super().chat(messages, **kwargs)

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        with self._faults():
            return super().complete(prompt, formatted, **kwargs)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        with self._faults():
            return self._guard(super().stream_chat(messages, **kwargs))

    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        with self._faults():
            return self._guard(super().stream_complete(prompt, formatted, **kwargs))

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        with self._faults():
            return await super().achat(messages, **kwargs)

    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        with self._faults():
            return await super().acomplete(prompt, formatted, **kwargs)

    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        with self._faults():
            return self._aguard(await super().astream_chat(messages, **kwargs))

    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        with self._faults():
            return self._aguard(await super().astream_complete(prompt, formatted, **kwargs))


_STATUS_HINTS = {
    400: "check llm.max_model_len and llm.max_tokens against the server's --max-model-len",
    401: "check llm.api_key, or RAG_APP_LLM__API_KEY, against the server's --api-key",
    403: "check llm.api_key, or RAG_APP_LLM__API_KEY, against the server's --api-key",
    404: "check llm.model: the server's --served-model-name; and that llm.api_base ends in /v1",
    429: "the server is overloaded: ask again later",
}


def build_server(cfg: RagConfig) -> VllmServerLLM:
    settings = cfg.llm
    extra: dict[str, Any] = {"top_p": settings.top_p}
    if settings.repetition_penalty != 1.0:
        extra["extra_body"] = {"repetition_penalty": settings.repetition_penalty}
    if settings.seed is not None:
        extra["seed"] = settings.seed
    return VllmServerLLM(
        model=settings.model,
        tokenizer=load_tokenizer(settings.tokenizer or settings.model),
        api_base=settings.api_base,
        api_key=settings.api_key.get_secret_value() or "EMPTY",
        is_chat_model=True,
        context_window=settings.max_model_len,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        additional_kwargs=extra,
        timeout=settings.request_timeout,
        retries=settings.max_retries,
    )


def load_tokenizer(name: str) -> Any:
    """The Hugging Face tokenizer prompts are packed with (a folder or ``org/name`` hub id),
    or ``None`` with a warning: a served name (``--served-model-name``) names no tokenizer,
    and packing then falls back to an approximate count that can overflow the server."""
    fix = (
        "set llm.tokenizer to the model's hub id or folder; prompts are packed with an "
        "approximate token count until then"
    )
    if not (Path(name).expanduser().is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", name)):
        log.warning("llm.model %r names no tokenizer: %s", name, fix)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        log.warning("cannot load the tokenizer %r (%s): %s", name, first_line(exc), fix)
        return None
