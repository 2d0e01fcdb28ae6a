"""Milvus as the LlamaIndex vector store: Milvus Lite (a local file) or a server, same code.

A collection remembers which embedding model filled it (a collection property), and a
store is refused when the model or the vector dimension does not match, instead of
silently mixing incomparable vectors.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from llama_index.core import StorageContext
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import VectorStoreQuery
from llama_index.vector_stores.milvus import MilvusVectorStore
from llama_index.vector_stores.milvus.utils import BM25BuiltInFunction
from pydantic import PrivateAttr
from pymilvus import AsyncMilvusClient, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from rag_app.components.embedding import build_embed_model, embedding_dimension, model_identity
from rag_app.config import RagConfig
from rag_app.errors import RagAppError

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_PROPERTY = "rag_app.embedding_model"
EMBEDDING_FIELD = "embedding"
SPARSE_FIELD = "sparse_embedding"


class RagMilvusVectorStore(MilvusVectorStore):
    """``MilvusVectorStore`` whose BM25-only search runs on Milvus Lite too.

    The base class searches the sparse field with ``drop_ratio_search = 0.2``, which Milvus
    Lite refuses ("only drop_ratio_search=0 is supported"); 0 (drop nothing, exact BM25)
    works on Lite and on servers. Lite also reports BM25 scores negated (best first, but
    -3.1 before -1.5); scores are returned as BM25 defines them, positive.

    Its async methods work from any event loop: pymilvus's async client is bound to the
    loop it first ran on, and the base class's single client fails with "Event loop is
    closed" once that loop is gone (a second ``asyncio.run``); here each running loop gets
    a client of its own.
    """

    _connection: dict[str, Any] = PrivateAttr(default_factory=dict)
    _retry_seconds: float = PrivateAttr(default=30.0)
    _loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncMilvusClient] = (
        PrivateAttr(default_factory=weakref.WeakKeyDictionary)
    )

    def __init__(self, *, uri: str, token: str = "", **kwargs: Any) -> None:
        super().__init__(uri=uri, token=token, **kwargs)
        self._connection = {"uri": uri, "token": token}

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> Any:
        """Search, retried while Milvus is unreachable (a search changes nothing)."""
        search = super().query
        return retrying(lambda: search(query, **kwargs), self, "search")

    @property
    def aclient(self) -> AsyncMilvusClient:
        loop = asyncio.get_running_loop()
        client = self._loop_clients.get(loop)
        if client is None:
            client = self._loop_clients[loop] = AsyncMilvusClient(**self._connection)
        return client

    def _sparse_search(
        self, query: VectorStoreQuery, string_expr: str, output_fields: list[str], **kwargs: Any
    ) -> tuple[list[BaseNode], list[float], list[str]]:
        if not isinstance(self.sparse_embedding_function, BM25BuiltInFunction):
            return super()._sparse_search(query, string_expr, output_fields, **kwargs)  # type: ignore[no-any-return]
        res = self.client.search(**_bm25_search(self, query, string_expr, output_fields, kwargs))
        nodes, scores, ids = self._parse_from_milvus_results(res)
        return nodes, [abs(score) for score in scores], ids

    async def _async_sparse_search(
        self, query: VectorStoreQuery, string_expr: str, output_fields: list[str], **kwargs: Any
    ) -> tuple[list[BaseNode], list[float], list[str]]:
        if not isinstance(self.sparse_embedding_function, BM25BuiltInFunction):
            return await super()._async_sparse_search(query, string_expr, output_fields, **kwargs)  # type: ignore[no-any-return]
        search = _bm25_search(self, query, string_expr, output_fields, kwargs)
        res = await self.aclient.search(**search)
        nodes, scores, ids = self._parse_from_milvus_results(res)
        return nodes, [abs(score) for score in scores], ids


def _bm25_search(
    store: MilvusVectorStore,
    query: VectorStoreQuery,
    string_expr: str,
    output_fields: list[str],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    return {
        "collection_name": store.collection_name,
        "data": [query.query_str],
        "anns_field": store.sparse_embedding_field,
        "limit": query.similarity_top_k,
        "filter": string_expr,
        "output_fields": output_fields,
        "search_params": {"params": {"drop_ratio_search": 0.0}},
        "partition_names": kwargs.get("milvus_partition_names"),
    }


def _not_loaded(exc: MilvusException) -> bool:
    """Whether the collection is not loaded: a restarted server holds its collections
    released (Lite: "state 'released'") or loading (Milvus 2.3+: code 101, "collection not
    loaded") until one is loaded."""
    message = str(exc.message)
    return exc.code == 101 or "state 'released'" in message or "collection not loaded" in message


def _unreachable(exc: MilvusException) -> bool:
    """Whether the server could not be reached (as opposed to refusing the request)."""
    message = str(exc.message).lower()
    return exc.code == 2 or "unavailable" in message or "fail connecting" in message


def retrying(call: Callable[[], T], store: MilvusVectorStore, what: str) -> T:
    """``call()``, retried with backoff while Milvus is unreachable, for up to the store's
    ``milvus.timeout`` seconds; only for calls that are safe to repeat (searches, upserts
    by id, deletes by filter). Failures become one-line :class:`RagAppError`\\ s."""
    budget = getattr(store, "_retry_seconds", 0.0)
    uri = getattr(store, "_connection", {}).get("uri", "")
    deadline, delay = time.monotonic() + budget, 0.5
    while True:
        try:
            return call()
        except MilvusException as exc:
            if _not_loaded(exc) and time.monotonic() < deadline:
                with suppress(MilvusException):
                    store.client.load_collection(store.collection_name)
                time.sleep(0.2)
                continue
            if not _unreachable(exc):
                raise RagAppError(f"Milvus at {uri} refused the {what}: {exc.message}") from None
            if time.monotonic() + delay > deadline:
                raise RagAppError(
                    f"Milvus at {uri} is unreachable ({what} retried for {budget:.0f} s): "
                    f"{exc.message} (start the server or check milvus.uri, then run the same "
                    "command again; an interrupted ingest resumes where it stopped)"
                ) from None
            log.warning("Milvus at %s unreachable; retrying the %s in %.1f s", uri, what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def _connect(cfg: RagConfig) -> MilvusClient:
    settings = cfg.milvus
    if settings.is_lite:
        Path(settings.uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=settings.uri, token=settings.token.get_secret_value())
    except MilvusException as exc:
        raise RagAppError(
            f"cannot connect to Milvus at {settings.uri}: {exc.message} "
            "(check milvus.uri and milvus.token; a Lite file is usable by one process at a time)"
        ) from None


def _collection_facts(info: dict[str, Any]) -> tuple[int | None, str | None, bool]:
    """From a collection's description: the dense vector dimension, the embedding model
    recorded, and whether it has BM25."""
    fields = info.get("fields", [])
    dim = next(
        (
            int(field["params"]["dim"])
            for field in fields
            if field.get("name") == EMBEDDING_FIELD and "dim" in field.get("params", {})
        ),
        None,
    )
    has_bm25 = any(field.get("name") == SPARSE_FIELD for field in fields)
    return dim, info.get("properties", {}).get(MODEL_PROPERTY), has_bm25


def build_vector_store(
    cfg: RagConfig, embed_model: BaseEmbedding | None = None
) -> MilvusVectorStore:
    """Open (or create) the configured collection as a ``MilvusVectorStore``.

    An existing collection is checked against the configured embedding model by name,
    and by dimension when ``embed_model`` is given; a new one takes its dimension from
    the model (loaded here if not given). Loads the collection for search, which a
    reopened collection needs.
    """
    settings = cfg.milvus
    identity = model_identity(cfg.embedding.model)
    client = _connect(cfg)
    try:
        exists = client.has_collection(settings.collection)
        if exists:
            dim, stored, bm25 = _collection_facts(client.describe_collection(settings.collection))
            if stored and stored != identity:
                raise RagAppError(
                    f"collection {settings.collection!r} at {settings.uri} was "
                    f"embedded with {stored!r}, not {identity!r} (use another "
                    "milvus.collection, or the model it was built with)"
                )
            model_dim = embedding_dimension(embed_model) if embed_model else dim
            if dim is not None and model_dim != dim:
                raise RagAppError(
                    f"collection {settings.collection!r} holds {dim}-d vectors but "
                    f"{identity!r} makes {model_dim}-d ones (use another milvus.collection)"
                )
        else:
            dim = embedding_dimension(embed_model or build_embed_model(cfg))
            bm25 = settings.bm25
        ranker, ranker_params = _hybrid_ranker(cfg)
        with quiet_lite_timestamps():
            store = RagMilvusVectorStore(  # type: ignore[call-arg]  # pydantic plugin vs. base __init__
                uri=settings.uri,
                token=settings.token.get_secret_value(),
                collection_name=settings.collection,
                dim=dim,
                embedding_field=EMBEDDING_FIELD,
                similarity_metric=settings.metric,
                index_config={"index_type": settings.index_type, **settings.index_params},
                search_config=dict(settings.search_params),
                consistency_level=settings.consistency_level,
                upsert_mode=True,
                overwrite=False,
                collection_properties=None if exists else {MODEL_PROPERTY: identity},
                enable_sparse=bm25,
                sparse_embedding_field=SPARSE_FIELD,
                sparse_embedding_function=(
                    BM25BuiltInFunction(input_field_names="text", output_field_names=SPARSE_FIELD)
                    if bm25
                    else None
                ),
                hybrid_ranker=ranker,
                hybrid_ranker_params=ranker_params,
            )
        store._retry_seconds = settings.timeout
        store.client.load_collection(settings.collection)
    except MilvusException as exc:
        uri = settings.uri
        raise RagAppError(f"Milvus at {uri} refused the request: {exc.message}") from None
    finally:
        if hasattr(client, "close"):
            client.close()
    return store


def _hybrid_ranker(cfg: RagConfig) -> tuple[str, dict[str, Any]]:
    """How Milvus fuses dense and BM25 results in hybrid mode."""
    settings = cfg.retrieval
    if settings.fusion == "weighted":
        return "WeightedRanker", {"weights": [settings.dense_weight, 1 - settings.dense_weight]}
    return "RRFRanker", {"k": settings.rrf_k}


def build_storage_context(
    cfg: RagConfig, embed_model: BaseEmbedding | None = None
) -> StorageContext:
    """A ``StorageContext`` whose vector store is the configured Milvus collection."""
    return StorageContext.from_defaults(vector_store=build_vector_store(cfg, embed_model))


@contextmanager
def quiet_lite_timestamps() -> Iterator[None]:
    """Silence Milvus Lite's noise around index creation and ``query_iterator``.

    Lite lacks the timestamp call pymilvus makes when it waits for an index or starts an
    iterator: Lite's in-process gRPC server logs a traceback and pymilvus a warning, then
    pymilvus falls back to a client-side timestamp, which is correct. Neither belongs on a
    user's terminal.
    """
    loggers = [logging.getLogger("grpc._server"), logging.getLogger("pymilvus.orm.iterator")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    rows: int
    dim: int | None
    model: str | None
    bm25: bool
    index_type: str | None = None
    metric: str | None = None
    index_params: dict[str, Any] = field(default_factory=dict)
    consistency_level: str | None = None


def _collection_info(client: MilvusClient, name: str) -> CollectionInfo:
    described: dict[str, Any] = client.describe_collection(name)
    dim, model, bm25 = _collection_facts(described)
    rows = _row_count(client, name)
    index: dict[str, Any] = {}
    if EMBEDDING_FIELD in client.list_indexes(name):
        index = dict(client.describe_index(name, EMBEDDING_FIELD))
    params = {
        key: value
        for key, value in index.items()
        if key not in {"index_type", "metric_type", "field_name", "index_name", "state"}
        and not key.endswith(("_rows", "_count"))
    }
    level: Any = described.get("consistency_level_name") or described.get("consistency_level")
    return CollectionInfo(
        name, rows, dim, model, bm25, index.get("index_type"), index.get("metric_type"),
        params, _CONSISTENCY_NAMES.get(level, None if level is None else str(level)),
    )  # fmt: skip


_CONSISTENCY_NAMES = {0: "Strong", 1: "Session", 2: "Bounded", 3: "Eventually"}


def _row_count(client: MilvusClient, name: str) -> int:
    """The rows a search finds. A server's statistics count flushed segments only (0 right
    after an ingest, deleted rows until compaction), so a loaded collection is counted;
    only an unloaded one, which cannot be queried, falls back to the statistics."""
    if client.get_load_state(name).get("state") == LoadState.Loaded:
        counted = client.query(
            name, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        return int(counted[0]["count(*)"])
    return int(client.get_collection_stats(name).get("row_count", 0))


def list_collections(cfg: RagConfig) -> list[CollectionInfo]:
    """Every collection at ``milvus.uri``: size, what embedded it, its index and search
    consistency."""
    client = _connect(cfg)
    try:
        return [_collection_info(client, name) for name in sorted(client.list_collections())]
    except MilvusException as exc:
        raise RagAppError(
            f"Milvus at {cfg.milvus.uri} refused the request: {exc.message}"
        ) from None
    finally:
        if hasattr(client, "close"):
            client.close()


def drop_collection(cfg: RagConfig, name: str) -> None:
    """Delete a collection and all its rows; a name that does not exist is an error."""
    client = _connect(cfg)
    try:
        if not client.has_collection(name):
            raise RagAppError(
                f"no collection {name!r} at {cfg.milvus.uri} (see rag-app collections)"
            )
        client.drop_collection(name)
    finally:
        if hasattr(client, "close"):
            client.close()
