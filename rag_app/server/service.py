"""What ``rag-app serve`` and ``rag-app mcp`` hold: the embedding model, the generator,
the collections' indexes, and the gate that admits answers.

One :class:`RagService` per process. It loads its models in the background (the HTTP
server answers ``/healthz`` meanwhile, and ``/readyz`` says when it is ready). Every
answer goes through :mod:`rag_app.pipelines.answer` (a single question) or
:func:`rag_app.pipelines.chat.astream_chat_answer` (a conversation), asynchronously,
so whatever is in flight reaches vLLM together and is batched.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_index.core import VectorStoreIndex
from llama_index.core.llms import LLM, ChatMessage
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle
from pydantic import ValidationError

from rag_app.components.embedding import build_embed_model, model_identity
from rag_app.components.llm import build_llm
from rag_app.components.retrieval import build_retriever, parse_filters
from rag_app.components.vector_store import (
    CollectionInfo,
    check_model_fits,
    list_collections,
    open_vector_store,
)
from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line
from rag_app.pipelines.answer import Answer, aanswer, astream_answer, check_question
from rag_app.pipelines.chat import astream_chat_answer, build_chat_engine
from rag_app.pipelines.query import build_index, build_query_engine
from rag_app.server.auth import OPEN, Principal, require_collection
from rag_app.server.errors import ApiError

log = logging.getLogger(__name__)

Items = AsyncGenerator[str | Answer, None]  # tokens, then the finished Answer
Mode = Literal["dense", "hybrid", "sparse"]
State = Literal["loading", "ready", "failed", "draining", "closed"]
_ENGINE_CACHE = 64  # retrieval set-ups kept (collection, mode, top_k, filters)


@dataclass(frozen=True)
class Ask:
    """One request for an answer, checked: the collection, the question (the last user
    turn), the turns before it, and the retrieval options."""

    collection: str
    question: str
    history: tuple[ChatMessage, ...] = ()
    top_k: int | None = None
    filters: tuple[str, ...] = ()
    mode: Mode | None = None


class Admission:
    """At most ``max_concurrent`` answers generate at once and ``max_queue`` wait for a
    turn; one beyond both is refused (429) at once rather than left to time out."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self._gate = asyncio.Semaphore(max_concurrent)
        self._limit = max_concurrent + max_queue
        self.admitted = 0  # generating or waiting
        self.running = 0

    async def enter(self) -> None:
        if self.admitted >= self._limit:
            raise ApiError(
                429,
                f"the service is busy: {self.running} answers generating and "
                f"{self.admitted - self.running} waiting (server.max_concurrent, "
                "server.max_queue); retry shortly",
                "server_busy",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1
        try:
            await self._gate.acquire()
        except BaseException:
            self.admitted -= 1
            raise
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self.admitted -= 1
        self._gate.release()


class AnswerStream:
    """An admitted answer being generated: iterate it for the tokens and then the
    finished :class:`Answer`. :meth:`aclose` stops the generation (if still running) and
    gives the turn back; call it however the stream ends."""

    def __init__(self, items: Items, release: Callable[[], None]) -> None:
        self._items = items
        self._release: Callable[[], None] | None = release
        self._primed: list[str | Answer] = []

    async def prime(self) -> None:
        """Run up to the first token (retrieval, the prompt, the first decode), so that a
        failure there is reported before any response is started."""
        with suppress(StopAsyncIteration):
            self._primed.append(await anext(self._items))

    async def __aiter__(self) -> Items:
        while self._primed:
            yield self._primed.pop(0)
        async for item in self._items:
            yield item

    async def aclose(self) -> None:
        try:
            await self._items.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


@dataclass
class _Setup:
    """What answers with one set of retrieval options share."""

    cfg: RagConfig
    retriever: BaseRetriever
    engines: dict[bool, RetrieverQueryEngine] = field(default_factory=dict)  # by streaming


class RagService:
    def __init__(self, cfg: RagConfig) -> None:
        self.cfg = cfg
        self.state: State = "loading"
        self.failure: str | None = None
        self.embed_model: Any = None
        self.llm: LLM | None = None
        self.admission = Admission(cfg.server.max_concurrent, cfg.server.max_queue)
        self.answered = 0
        self.failed = 0
        self._loaded = asyncio.Event()
        self._indexes: dict[str, VectorStoreIndex] = {}
        self._index_locks: dict[str, asyncio.Lock] = {}
        self._setups: OrderedDict[tuple[Any, ...], _Setup] = OrderedDict()
        self._loader: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    def start_loading(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Load the models in the background; ``on_failure`` hears why they could not be."""

        async def load() -> None:
            await self.load()
            if self.failure is not None and on_failure is not None:
                on_failure(self.failure)

        self._loader = asyncio.create_task(load(), name="rag-app-load")

    async def load(self) -> None:
        try:
            log.info("loading the embedding model %s", self.cfg.embedding.model)
            self.embed_model = await asyncio.to_thread(build_embed_model, self.cfg)
            log.info("starting the generator (%s, llm.mode = %s)", self.cfg.llm.model,
                     self.cfg.llm.mode)  # fmt: skip
            self.llm = await asyncio.to_thread(build_llm, self.cfg)
            await self._open_served()
            if self.state == "loading":
                self.state = "ready"
                log.info("ready")
        except RagAppError as exc:
            self.state, self.failure = "failed", str(exc)
        except Exception as exc:  # a library's own error: one line, not a traceback
            self.state, self.failure = "failed", f"cannot load the models: {first_line(exc)}"
        finally:
            self._loaded.set()

    async def wait_ready(self) -> None:
        """Until the models are loaded (for callers that may wait, such as MCP over stdio)."""
        await self._loaded.wait()
        self.require_ready()

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        reasons = {
            "loading": ("the models are still loading: retry in a few seconds", "not_ready"),
            "draining": ("the service is shutting down", "shutting_down"),
            "closed": ("the service is shutting down", "shutting_down"),
        }
        message, code = reasons.get(self.state, (f"the service failed: {self.failure}", "failed"))
        raise ApiError(503, message, code, headers={"Retry-After": "5"})

    async def close(self) -> None:
        """Stop the generator (a local vLLM engine and its process)."""
        self.state = "closed"
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        llm, self.llm = self.llm, None
        close = getattr(llm, "close", None)
        if callable(close):
            await asyncio.to_thread(close)

    def engine_requests(self) -> int | None:
        """Requests the local vLLM engine holds unfinished (``None`` in server mode)."""
        try:
            engine = getattr(self.llm, "engine", None)
        except RagAppError:  # closed
            return None
        count = getattr(engine, "get_num_unfinished_requests", None)
        return int(count()) if callable(count) else None

    def metrics(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "running": self.admission.running,
            "queued": self.admission.admitted - self.admission.running,
            "engine_requests": self.engine_requests(),
            "answered": self.answered,
            "failed": self.failed,
        }

    # -- collections -----------------------------------------------------------------------

    async def collections(self, principal: Principal = OPEN) -> list[CollectionInfo]:
        """The collections served to ``principal``: those at ``milvus.uri`` embedded with
        this service's embedding model (and in ``server.collections``, when set)."""
        infos = await asyncio.to_thread(list_collections, self.cfg)
        identity = model_identity(self.cfg.embedding.model)
        listed = set(self.cfg.server.collections)
        return [
            info
            for info in infos
            if info.model in (None, identity)
            and (not listed or info.name in listed)
            and principal.may_use(info.name)
        ]

    def check_collection(self, principal: Principal, collection: str) -> None:
        """403 for a collection the caller's key may not use; 404 for one not served."""
        require_collection(principal, collection)
        listed = self.cfg.server.collections
        if listed and collection not in listed:
            raise _not_found(collection)

    async def _open_served(self) -> None:
        """Open the collections there are now, before the first question needs them; one
        that cannot be opened is left for its first request to report."""
        for info in await self.collections():
            try:
                await self._index(info.name)
            except (ApiError, RagAppError) as exc:
                log.warning("collection %s not opened: %s", info.name, exc)

    async def index(self, collection: str) -> VectorStoreIndex:
        """The collection's index, opened once (404 if there is no such collection; 503 if
        Milvus cannot be reached)."""
        self.require_ready()
        try:
            return await self._index(collection)
        except RagAppError as exc:
            raise unavailable(exc) from None

    async def _index(self, collection: str) -> VectorStoreIndex:
        if collection in self._indexes:
            return self._indexes[collection]
        lock = self._index_locks.setdefault(collection, asyncio.Lock())
        async with lock:
            if collection not in self._indexes:
                self._indexes[collection] = await asyncio.to_thread(self._open, collection)
        return self._indexes[collection]

    def _open(self, collection: str) -> VectorStoreIndex:
        cfg = self._cfg(collection, None)
        store = open_vector_store(cfg)
        if store is None:
            raise _not_found(collection)
        try:
            check_model_fits(cfg, store, self.embed_model)
        except RagAppError as exc:
            raise ApiError(404, str(exc), "model_not_found", param="model") from None
        return build_index(cfg, embed_model=self.embed_model, vector_store=store)

    def _cfg(self, collection: str, mode: Mode | None) -> RagConfig:
        cfg = self.cfg.model_copy(deep=True)
        cfg.milvus.collection = collection
        if mode is not None:
            try:
                cfg.retrieval.mode = mode
            except ValidationError as exc:
                message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ApiError(400, message, "invalid_mode", param="mode") from None
        return cfg

    async def _setup(self, ask: Ask) -> _Setup:
        index = await self.index(ask.collection)
        key = (ask.collection, ask.mode, ask.top_k, ask.filters)
        setup = self._setups.get(key)
        if setup is None:
            cfg = self._cfg(ask.collection, ask.mode)
            try:
                filters = parse_filters(ask.filters)
                retriever = build_retriever(
                    cfg, index, top_k=ask.top_k, filters=filters, embed_model=self.embed_model
                )
            except RagAppError as exc:
                raise ApiError(400, str(exc), "invalid_retrieval") from None
            setup = self._setups[key] = _Setup(cfg, retriever)
            while len(self._setups) > _ENGINE_CACHE:
                self._setups.popitem(last=False)
        self._setups.move_to_end(key)
        return setup

    def _query_engine(self, setup: _Setup, streaming: bool) -> RetrieverQueryEngine:
        if streaming not in setup.engines:
            setup.engines[streaming] = build_query_engine(
                setup.cfg, llm=self.llm, retriever=setup.retriever, streaming=streaming
            )
        return setup.engines[streaming]

    # -- work ------------------------------------------------------------------------------

    def make_ask(
        self,
        caller: Principal,
        collection: str | None,
        question: str,
        history: Sequence[ChatMessage] = (),
        top_k: int | None = None,
        filters: Sequence[str] | None = None,
        mode: Mode | None = None,
    ) -> Ask:
        """A request checked before any work: the collection (403, 404), the question,
        ``top_k`` and the filters (400)."""
        limits = self.cfg.server
        name = collection or self.cfg.milvus.collection
        self.check_collection(caller, name)
        if top_k is not None and not 1 <= top_k <= limits.max_top_k:
            raise ApiError(400, f"top_k must be between 1 and {limits.max_top_k} here, got "
                           f"{top_k}", "invalid_top_k", param="top_k")  # fmt: skip
        try:
            question = check_question(question, self.cfg)
            parse_filters(list(filters or ()))
        except RagAppError as exc:
            raise ApiError(400, str(exc), "invalid_request") from None
        return Ask(name, question, tuple(history), top_k, tuple(filters or ()), mode)

    async def retrieve(self, ask: Ask) -> list[NodeWithScore]:
        """The chunks an answer to ``ask.question`` would be given."""
        setup = await self._setup(ask)
        with self._answering():
            return await setup.retriever.aretrieve(QueryBundle(ask.question))

    async def answer(self, ask: Ask) -> Answer:
        """The whole answer, once it is complete."""
        setup = await self._setup(ask)
        async with self._admitted():
            with self._answering():
                if not ask.history:
                    return await aanswer(self._query_engine(setup, False), ask.question)
                answer: Answer | None = None
                async for item in self._chat(setup, ask):
                    if isinstance(item, Answer):
                        answer = item
                assert answer is not None
                return answer

    async def stream(self, ask: Ask) -> AnswerStream:
        """The answer as it is generated, primed to its first token; the caller must
        ``aclose()`` it however it ends."""
        setup = await self._setup(ask)
        await self.admission.enter()
        try:
            items = (
                self._chat(setup, ask)
                if ask.history
                else astream_answer(self._query_engine(setup, True), ask.question)
            )
        except BaseException:
            self.admission.leave()
            raise
        stream = AnswerStream(self._counted(items), self.admission.leave)
        try:
            with self._answering():
                await stream.prime()
        except BaseException:
            await stream.aclose()
            raise
        return stream

    def _chat(self, setup: _Setup, ask: Ask) -> Items:
        engine = build_chat_engine(setup.cfg, llm=self.llm, retriever=setup.retriever)
        return astream_chat_answer(engine, ask.question, ask.history)

    async def _counted(self, items: Items) -> Items:
        try:
            async for item in items:
                if isinstance(item, Answer):
                    self.answered += 1
                yield item
        except RagAppError:
            self.failed += 1
            raise
        finally:
            await items.aclose()  # at once: aborts the request

    @contextmanager
    def _answering(self) -> Iterator[None]:
        try:
            yield
        except RagAppError as exc:
            self.failed += 1
            raise unavailable(exc) from None

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        await self.admission.enter()
        try:
            yield
            self.answered += 1
        finally:
            self.admission.leave()


def _not_found(collection: str) -> ApiError:
    return ApiError(
        404,
        f"no collection {collection!r} is served here (GET /v1/models lists them)",
        "model_not_found",
        param="model",
    )


def unavailable(exc: RagAppError) -> ApiError:
    """A failure while answering (Milvus or the generator unreachable, say) is the
    service's, not the request's: 503 with its one-line reason."""
    return ApiError(503, f"cannot answer now: {exc}", "upstream_unavailable")
