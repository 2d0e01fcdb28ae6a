"""A client of a running ``rag-app serve``: the official ``openai`` client for answers
(the extra fields read back from the response), ``httpx`` for ``/v1/retrieve``.

``rag-app query --server``, ``rag-app chat --server`` and ``rag-app mcp --server`` use it;
it loads no model, so an answer costs retrieval and generation, not start-up. Answers come
back in the shape of :func:`rag_app.pipelines.answer.answer_dict`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import httpx
import openai

from rag_app.errors import RagAppError, first_line

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

EXTRAS = ("sources", "citations", "abstained", "timings")


class RagClient:
    def __init__(self, url: str, api_key: str = "", *, timeout: float = 120.0) -> None:
        base = url.rstrip("/").removesuffix("/v1")
        if not base.startswith(("http://", "https://")):
            raise RagAppError(f"not a server URL: {url!r} (write http://HOST:PORT)")
        self.url = base
        # Without keys on the server any bearer is accepted; the client insists on one.
        key = api_key or "no-key"
        self._openai = openai.AsyncOpenAI(
            base_url=f"{base}/v1", api_key=key, timeout=timeout, max_retries=1
        )
        self._http = httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._openai.close()
        await self._http.aclose()

    async def __aenter__(self) -> RagClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    def _body(top_k: int | None, filters: Sequence[str] | None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if top_k is not None:
            body["top_k"] = top_k
        if filters:
            body["filters"] = list(filters)
        return body

    async def answer(
        self,
        messages: Sequence[dict[str, str]],
        *,
        collection: str,
        top_k: int | None = None,
        filters: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The whole answer to the conversation's last user message."""
        try:
            completion = await self._openai.chat.completions.create(
                model=collection,
                messages=_params(messages),
                extra_body=self._body(top_k, filters),
            )
        except openai.APIError as exc:
            raise self._error(exc) from None
        extra = completion.model_extra or {}
        return _answer(messages, completion.choices[0].message.content or "", extra)

    async def stream(
        self,
        messages: Sequence[dict[str, str]],
        *,
        collection: str,
        top_k: int | None = None,
        filters: Sequence[str] | None = None,
    ) -> AsyncIterator[str | dict[str, Any]]:
        """The answer's tokens as they arrive, then the answer as :meth:`answer` gives it."""
        text: list[str] = []
        final: dict[str, Any] = {}
        try:
            chunks = await self._openai.chat.completions.create(
                model=collection,
                messages=_params(messages),
                stream=True,
                extra_body=self._body(top_k, filters),
            )
            async for chunk in chunks:
                extra = chunk.model_extra or {}
                if "sources" in extra:
                    final = extra
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    text.append(delta)
                    yield delta
        except openai.APIError as exc:
            raise self._error(exc) from None
        except httpx.HTTPError as exc:
            raise RagAppError(f"the answer from {self.url} broke off: {first_line(exc)}") from None
        yield _answer(messages, str(final.get("answer", "".join(text))), final)

    async def retrieve(
        self,
        query: str,
        *,
        collection: str,
        top_k: int | None = None,
        filters: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The chunks the server would answer ``query`` from (``/v1/retrieve``)."""
        body = {"model": collection, "query": query, **self._body(top_k, filters)}
        try:
            reply = await self._http.post("/v1/retrieve", json=body)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if reply.status_code != 200:
            raise RagAppError(f"rag-app serve at {self.url} answered {reply.status_code}: "
                              f"{_message(reply)}")  # fmt: skip
        return reply.json()  # type: ignore[no-any-return]

    def _error(self, exc: openai.APIError) -> RagAppError:
        if isinstance(exc, openai.APIConnectionError):
            return self._unreachable(exc)
        status = getattr(exc, "status_code", None)
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") or exc.message
        where = f"rag-app serve at {self.url}"
        if status == 401:
            message += " (set RAG_APP_CLIENT__API_KEY to one of the server's keys)"
        return RagAppError(f"{where} answered {status}: {message}" if status else
                           f"{where}: {message}")  # fmt: skip

    def _unreachable(self, exc: BaseException) -> RagAppError:
        return RagAppError(
            f"cannot reach rag-app serve at {self.url} ({first_line(exc)}): start it with "
            "`rag-app serve`, or check --server / client.server_url"
        )


def _params(messages: Sequence[dict[str, str]]) -> list[ChatCompletionMessageParam]:
    return cast("list[ChatCompletionMessageParam]", list(messages))


def _message(reply: httpx.Response) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return reply.text[:200]


def _answer(messages: Sequence[dict[str, str]], text: str, extra: dict[str, Any]) -> dict[str, Any]:
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return {"question": question, "answer": text, **{k: extra[k] for k in EXTRAS if k in extra}}
