"""The OpenAI-compatible API: ``/v1/models`` (one model per collection),
``/v1/chat/completions`` (answers from that collection, streamed or whole) and
``/v1/retrieve`` (the chunks only).

OpenAI's request and response shapes, plus documented extra fields (docs/serve.md):
requests may carry ``top_k``, ``filters`` (the CLI's ``KEY=VALUE`` forms) and ``mode``;
every answer carries ``sources``, ``citations``, ``abstained`` and ``timings`` (a stream
sends them in its last chunk, before ``[DONE]``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from llama_index.core.llms import ChatMessage
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from rag_app.errors import RagAppError, first_line
from rag_app.pipelines.answer import Answer, answer_dict, source_dicts
from rag_app.pipelines.ingest import CHUNKS_KEY, HASH_KEY, WRITTEN_KEY
from rag_app.server.auth import Principal
from rag_app.server.errors import ApiError, error_body
from rag_app.server.service import AnswerStream, Ask, RagService, unavailable

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
_EXTRAS = ("sources", "citations", "abstained", "timings")
_BOOKKEEPING = {HASH_KEY, CHUNKS_KEY, WRITTEN_KEY}  # ingest's own, not the document's


class _Request(BaseModel):
    # OpenAI fields this service does not use (temperature, user, ...) are accepted and
    # ignored: generation settings are the service's own (llm.* settings).
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Request):
    type: str
    text: str | None = None


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(part.type != "text" for part in self.content):
                raise ApiError(400, "only text content is supported", "unsupported_content",
                               param="messages")  # fmt: skip
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class Retrieval(_Request):
    model: str | None = Field(None, description="the collection; default milvus.collection")
    top_k: int | None = Field(None, ge=1, description="chunks to retrieve")
    filters: list[str] | None = Field(None, description="KEY=VALUE or KEY=PREFIX*, all must match")
    mode: Literal["dense", "hybrid", "sparse"] | None = None


class ChatRequest(Retrieval):
    messages: list[Message] = Field(min_length=1)
    stream: bool = False


class RetrieveRequest(Retrieval):
    query: str


def service(request: Request) -> RagService:
    return request.app.state.service  # type: ignore[no-any-return]


def principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer KEY`` (401 without a valid one)."""
    return request.app.state.keys.check(request.headers.get("authorization"))  # type: ignore[no-any-return]


Service = Annotated[RagService, Depends(service)]
Caller = Annotated[Principal, Depends(principal)]


def _chat_ask(service: RagService, caller: Principal, body: ChatRequest) -> Ask:
    """The last user message is the question; the user and assistant turns before it are
    the conversation (system messages are left out: the service's grounded prompt rules)."""
    if len(body.messages) > service.cfg.server.max_messages:
        raise ApiError(400, f"{len(body.messages)} messages, over this service's limit of "
                       f"{service.cfg.server.max_messages}", "too_many_messages",
                       param="messages")  # fmt: skip
    turns: list[tuple[str, str]] = []
    for message in body.messages:
        if message.role in ("tool", "function"):
            raise ApiError(400, "tool and function messages are not supported",
                           "unsupported_role", param="messages")  # fmt: skip
        if message.role in ("user", "assistant"):
            turns.append((message.role, message.text()))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's question", "no_question",
                       param="messages")  # fmt: skip
    history = tuple(ChatMessage(role=role, content=text) for role, text in turns[:-1])
    return service.make_ask(
        caller, body.model, turns[-1][1], history, body.top_k, body.filters, body.mode
    )


@router.get("/models")
async def list_models(rag: Service, caller: Caller) -> dict[str, Any]:
    rag.require_ready()
    try:
        infos = await rag.collections(caller)
    except RagAppError as exc:
        raise unavailable(exc) from None
    return {"object": "list", "data": [_model(info.name, info.rows) for info in infos]}


@router.get("/models/{model}")
async def get_model(model: str, rag: Service, caller: Caller) -> dict[str, Any]:
    rag.require_ready()
    rag.check_collection(caller, model)
    try:
        infos = {info.name: info for info in await rag.collections(caller)}
    except RagAppError as exc:
        raise unavailable(exc) from None
    if model not in infos:
        raise ApiError(404, f"no collection {model!r} is served here (GET /v1/models lists "
                       "them)", "model_not_found", param="model")  # fmt: skip
    return _model(model, infos[model].rows)


def _model(name: str, rows: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "rag_app", "chunks": rows}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatRequest, rag: Service, caller: Caller
) -> dict[str, Any] | StreamingResponse:
    rag.require_ready()
    ask = _chat_ask(rag, caller, body)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": ask.collection,
    }
    if not body.stream:
        answer = await rag.answer(ask)
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.answer},
                    "finish_reason": "stop",
                }
            ],
            **extras(answer),
        }
    stream = await rag.stream(ask)
    return ClosingStream(_events(stream, head), stream.aclose)


@router.post("/retrieve")
async def retrieve(body: RetrieveRequest, rag: Service, caller: Caller) -> dict[str, Any]:
    rag.require_ready()
    ask = rag.make_ask(caller, body.model, body.query, (), body.top_k, body.filters, body.mode)
    started = time.perf_counter()
    nodes = await rag.retrieve(ask)
    chunks = source_dicts(nodes)
    for chunk, node in zip(chunks, nodes, strict=True):
        metadata = node.node.metadata.items()
        chunk["metadata"] = {k: v for k, v in metadata if k not in _BOOKKEEPING}
    return {
        "object": "list",
        "model": ask.collection,
        "data": chunks,
        "timings": {"retrieve": round(time.perf_counter() - started, 4)},
    }


def extras(answer: Answer) -> dict[str, Any]:
    """The documented extra fields of an answer: sources, citations, abstained, timings."""
    fields = answer_dict(answer)
    return {name: fields[name] for name in _EXTRAS if name in fields}


async def _events(stream: AnswerStream, head: dict[str, Any]) -> AsyncIterator[bytes]:
    """The answer in OpenAI's chunk format, as server-sent events; the last chunk holds
    the extra fields and the answer as checked (citations to no source removed)."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        body = {**head, "object": "chat.completion.chunk", "choices": [choice], **more}
        return f"data: {json.dumps(body)}\n\n".encode()

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for item in stream:
            if isinstance(item, Answer):
                yield chunk({}, "stop", answer=item.answer, **extras(item))
            elif item:
                yield chunk({"content": item})
    except RagAppError as exc:
        yield _event(unavailable(exc).body())
        return
    except ApiError as exc:
        yield _event(exc.body())
        return
    except Exception as exc:  # not a traceback to the client; the log has the detail
        log.exception("an answer failed while streaming")
        yield _event(error_body(500, f"the answer failed: {first_line(exc)}", "server_error"))
        return
    yield b"data: [DONE]\n\n"


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


class ClosingStream(StreamingResponse):
    """A server-sent event stream that runs ``on_close`` however it ends: completed, the
    client gone (Starlette cancels the sender, which aborts the generation), or the
    server shutting down."""

    def __init__(
        self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self._content, "aclose", None)
            if close is not None:
                await close()
            await self._on_close()


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
