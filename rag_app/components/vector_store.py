"""Milvus as the LlamaIndex vector store: Milvus Lite (a local file) or a server, same code.

A collection remembers which embedding model filled it (a collection property), and a
store is refused when the model or the vector dimension does not match, instead of
silently mixing incomparable vectors.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, overload

from llama_index.core import StorageContext
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import BaseNode
from llama_index.core.utils import iter_batch
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode
from llama_index.core.vector_stores.utils import node_to_metadata_dict
from llama_index.vector_stores.milvus import MilvusVectorStore
from llama_index.vector_stores.milvus.utils import BM25BuiltInFunction
from pydantic import PrivateAttr
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from rag_app.compat import milvus_lite as milvus_lite_compat
from rag_app.compat.llama_index_milvus import MilvusVectorStoreCompat
from rag_app.components.context import CONTEXT_KEY, contextual_text
from rag_app.components.embedding import build_embed_model, embedding_dimension, model_identity
from rag_app.config import RagConfig
from rag_app.errors import RagAppError

log = logging.getLogger(__name__)
T = TypeVar("T")

MODEL_PROPERTY = "rag_app.embedding_model"
EMBEDDING_FIELD = "embedding"
SPARSE_FIELD = "sparse_embedding"
# What BM25 reads in collections created with it since the context template: a chunk's
# context header and text, exactly what was embedded; "text" stays the bare chunk the LLM
# and the sources show. Older collections compute BM25 from "text" (see _bm25_input).
CONTEXT_FIELD = "context_text"
TEXT_FIELD = "text"
# What LlamaIndex rebuilds a node from (text_key is added by the store itself).
NODE_FIELDS = ["_node_content", "_node_type"]


class RagMilvusVectorStore(MilvusVectorStoreCompat):
    """``MilvusVectorStore`` whose searches, sync and async, are retried while Milvus is
    unreachable (a search changes nothing), and whose BM25-only search runs on Milvus Lite
    (see :mod:`rag_app.compat.llama_index_milvus`)."""

    _retry: MilvusRetry = PrivateAttr()
    # The scalar field that holds each chunk's contextual text (None: the collection has
    # none, written before the context template or without BM25).
    context_field: str | None = None

    def __init__(
        self, *, retry_seconds: float, context_field: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)  # upstream passes unknown keywords to MilvusClient
        self.context_field = context_field
        self._retry = MilvusRetry(
            kwargs["uri"], retry_seconds, lambda: self.client.load_collection(self.collection_name)
        )

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Upstream's upsert of the nodes, plus each chunk's contextual text in
        :data:`CONTEXT_FIELD` when the collection has one. Upstream writes the text field and
        metadata only; the contextual text is not metadata, since metadata is also stored
        in every row's ``_node_content`` and returned with every search hit."""
        if self.context_field is None:
            return super().add(list(nodes), **add_kwargs)  # type: ignore[no-any-return]
        write = self.client.upsert if self.upsert_mode else self.client.insert
        for batch in iter_batch([self._row(node) for node in nodes], self.batch_size):
            write(
                self.collection_name, batch, partition_name=add_kwargs.get("milvus_partition_name")
            )
        if add_kwargs.get("force_flush", False):
            self.client.flush(self.collection_name)
        return [node.node_id for node in nodes]

    async def async_add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """:meth:`add` on the async client."""
        if self.context_field is None:
            return await super().async_add(list(nodes), **add_kwargs)  # type: ignore[no-any-return]
        write = self.aclient.upsert if self.upsert_mode else self.aclient.insert
        for batch in iter_batch([self._row(node) for node in nodes], self.batch_size):
            await write(
                self.collection_name, batch, partition_name=add_kwargs.get("milvus_partition_name")
            )
        if add_kwargs.get("force_flush", False):
            await self.aclient.flush(self.collection_name)
        return [node.node_id for node in nodes]

    def _row(self, node: BaseNode) -> dict[str, Any]:
        """A node as upstream's ``add`` writes it (metadata, ``_node_content``, text, id,
        dense vector; BM25 is computed by Milvus), with its contextual text."""
        row = node_to_metadata_dict(node, remove_text=True, text_field=self.text_key)
        text = node.get_content()
        row[self.text_key] = text
        row["id"] = node.node_id
        row[self.embedding_field] = node.embedding
        row[self.context_field or CONTEXT_FIELD] = contextual_text(
            text, node.metadata.get(CONTEXT_KEY)
        )
        return row

    @property
    def retry(self) -> MilvusRetry:
        """The retry policy of this store's calls, for writers that share it."""
        return self._retry

    def _with_fields(self, query: VectorStoreQuery) -> VectorStoreQuery:
        """MMR compares the hits' vectors, so an MMR search returns them as well."""
        if query.mode != VectorStoreQueryMode.MMR or not self.output_fields:
            return query
        if query.output_fields is not None or self.embedding_field in self.output_fields:
            return query
        return replace(query, output_fields=[*self.output_fields, self.embedding_field])

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> Any:
        search, query = super().query, self._with_fields(query)
        return self._retry.call(lambda: search(query, **kwargs), "search")

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> Any:
        search, query = super().aquery, self._with_fields(query)
        return await self._retry.acall(lambda: search(query, **kwargs), "search")


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


@dataclass(frozen=True)
class MilvusRetry:
    """Retries of calls that are safe to repeat (searches, upserts by id, deletes by
    filter) while Milvus is unreachable, with backoff, for up to ``seconds``
    (``milvus.timeout``); a restarted server's released collection is loaded again.
    Failures become one-line :class:`RagAppError`\\ s."""

    uri: str
    seconds: float
    reload: Callable[[], object] | None = None

    @classmethod
    def for_store(cls, cfg: RagConfig, store: MilvusVectorStore) -> MilvusRetry:
        name = store.collection_name
        return cls(cfg.milvus.uri, cfg.milvus.timeout, lambda: store.client.load_collection(name))

    def call(self, call: Callable[[], T], what: str) -> T:
        deadline, delay = time.monotonic() + self.seconds, 0.5
        while True:
            try:
                return call()
            except MilvusException as exc:
                wait = self._wait_before_retry(exc, what, deadline, delay)
            time.sleep(wait)
            delay = min(delay * 2, 8.0) if wait == delay else delay

    async def acall(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        deadline, delay = time.monotonic() + self.seconds, 0.5
        while True:
            try:
                return await call()
            except MilvusException as exc:
                wait = self._wait_before_retry(exc, what, deadline, delay)
            await asyncio.sleep(wait)
            delay = min(delay * 2, 8.0) if wait == delay else delay

    def _wait_before_retry(
        self, exc: MilvusException, what: str, deadline: float, delay: float
    ) -> float:
        """Seconds to wait before the next try, or the error that ends the tries."""
        if _not_loaded(exc) and time.monotonic() < deadline:
            if self.reload is not None:
                with suppress(MilvusException):
                    self.reload()
            return 0.2
        if not _unreachable(exc):
            raise RagAppError(f"Milvus at {self.uri} refused the {what}: {exc.message}") from None
        if time.monotonic() + delay > deadline:
            raise RagAppError(
                f"Milvus at {self.uri} is unreachable ({what} retried for {self.seconds:.0f} s): "
                f"{exc.message} (start the server or check milvus.uri, then run the same "
                "command again; an interrupted ingest resumes where it stopped)"
            ) from None
        log.warning("Milvus at %s unreachable; retrying the %s in %.1f s", self.uri, what, delay)
        return delay


def _connect(cfg: RagConfig) -> MilvusClient:
    """A client of the configured Milvus. A Lite file's engine runs in this process; its BM25
    is made to score with the whole collection's statistics first (see
    :mod:`rag_app.compat.milvus_lite`: without it, rows added since the collection was last
    flushed, e.g. by a later ingest, are scored against themselves alone), and NumPy's BLAS
    is kept to one thread (:func:`~rag_app.compat.milvus_lite.one_blas_thread`)."""
    settings = cfg.milvus
    if settings.is_lite:
        _check_lite_path(Path(settings.uri).expanduser())
        milvus_lite_compat.install()
        milvus_lite_compat.accept_keepalive_pings()  # long-lived processes: rag-app serve
        milvus_lite_compat.one_blas_thread()  # Lite's searches run in this process
    try:
        return MilvusClient(uri=settings.uri, token=settings.token.get_secret_value())
    except MilvusException as exc:
        hint = (
            "a Lite file is usable by one process at a time"
            if settings.is_lite
            else "check milvus.uri and milvus.token"
        )
        raise RagAppError(
            f"cannot connect to Milvus at {settings.uri}: {exc.message} ({hint})"
        ) from None
    except OSError as exc:
        raise RagAppError(
            f"cannot open the Milvus Lite file {settings.uri}: {exc.strerror or exc} "
            "(set milvus.uri to a .db path in a folder you can write to)"
        ) from None


def _check_lite_path(path: Path) -> None:
    """A Milvus Lite file's path, made usable or refused in one line naming the folder: the
    Lite engine's own errors for a missing, unwritable or misnamed path are a traceback, or
    "Open local milvus failed", which reads like the file is in use."""
    fix = "set milvus.uri to a .db path in a folder you can write to, or a server uri"
    if path.suffix != ".db":
        raise RagAppError(
            f"milvus.uri {str(path)!r} is neither a server uri (http://, https://, tcp://, "
            f"grpc://, unix:) nor a Milvus Lite file name ending in .db ({fix})"
        )
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RagAppError(
            f"cannot create the folder {folder} for the Milvus Lite file {path.name}: "
            f"{exc.strerror or exc} ({fix})"
        ) from None
    probe_in = path if path.is_dir() else folder  # the engine writes inside an existing file
    try:
        with tempfile.TemporaryFile(dir=probe_in):
            pass
    except OSError as exc:
        raise RagAppError(
            f"the folder {probe_in} of the Milvus Lite file {path.name} is not writable: "
            f"{exc.strerror or exc} ({fix})"
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


def _bm25_input(info: dict[str, Any]) -> str:
    """The field a collection's BM25 function reads: :data:`CONTEXT_FIELD` in collections
    created since the context template, :data:`TEXT_FIELD` in older ones."""
    for function in info.get("functions", []):
        inputs = function.get("input_field_names") or []
        if function.get("output_field_names") == [SPARSE_FIELD] and inputs:
            return str(inputs[0])
    return TEXT_FIELD


def build_vector_store(
    cfg: RagConfig, embed_model: BaseEmbedding | None = None
) -> MilvusVectorStore:
    """Open (or create) the configured collection as a ``MilvusVectorStore``.

    An existing collection is checked against the configured embedding model by name,
    and by dimension when ``embed_model`` is given; a new one takes its dimension from
    the model (loaded here if not given). Loads the collection for search, which a
    reopened collection needs.
    """
    store = open_vector_store(cfg)
    if store is None:
        return _open_or_create(cfg, embedding_dimension(embed_model or build_embed_model(cfg)))
    if embed_model is not None:
        check_model_fits(cfg, store, embed_model)
    return store


def open_vector_store(cfg: RagConfig) -> MilvusVectorStore | None:
    """The configured collection if it exists (checked against the configured model's
    name, not its dimension: no model is loaded), else ``None``."""
    return _open_or_create(cfg, None)


def record_model(cfg: RagConfig, store: MilvusVectorStore) -> None:
    """Mark an adopted collection as rag_app's: record the embedding model on it (the property
    rag_app sets on the collections it creates), if it is not recorded yet."""
    name = store.collection_name
    properties = store.client.describe_collection(name).get("properties", {})
    if MODEL_PROPERTY not in properties:
        identity = model_identity(cfg.embedding.model)
        store.client.alter_collection_properties(name, properties={MODEL_PROPERTY: identity})
        log.info("collection %r adopted: its embedding model is now recorded as %r", name, identity)


def check_model_fits(cfg: RagConfig, store: MilvusVectorStore, embed_model: BaseEmbedding) -> None:
    """Refuse a model whose vectors have another dimension than the collection's."""
    model_dim = embedding_dimension(embed_model)
    if store.dim is not None and model_dim != store.dim:
        raise RagAppError(
            f"collection {store.collection_name!r} holds {store.dim}-d vectors but "
            f"{model_identity(cfg.embedding.model)!r} makes {model_dim}-d ones "
            "(use another milvus.collection)"
        )


@overload
def _open_or_create(cfg: RagConfig, new_dim: int) -> MilvusVectorStore: ...
@overload
def _open_or_create(cfg: RagConfig, new_dim: None) -> MilvusVectorStore | None: ...


def _open_or_create(cfg: RagConfig, new_dim: int | None) -> MilvusVectorStore | None:
    """Open the collection, or create it with ``new_dim`` (``None``: do not create)."""
    settings = cfg.milvus
    identity = model_identity(cfg.embedding.model)
    client = _connect(cfg)
    try:
        exists = client.has_collection(settings.collection)
        if exists:
            described = client.describe_collection(settings.collection)
            dim, stored, bm25 = _collection_facts(described)
            bm25_input = _bm25_input(described) if bm25 else None
            if stored is None and not settings.adopt_foreign_collection:
                raise RagAppError(
                    f"collection {settings.collection!r} at {settings.uri} was not made by "
                    f"rag_app (it has no {MODEL_PROPERTY} property), so its data is left "
                    "alone: use another milvus.collection, or take it over with "
                    "`rag-app ingest --adopt` (milvus.adopt_foreign_collection = true): an "
                    "ingest then syncs it, deleting the documents that are not in the folder"
                )
            if stored and stored != identity:
                raise RagAppError(
                    f"collection {settings.collection!r} at {settings.uri} was "
                    f"embedded with {stored!r}, not {identity!r} (use another "
                    "milvus.collection, or the model it was built with)"
                )
        elif new_dim is None:
            return None
        else:
            dim, bm25 = new_dim, settings.bm25
            bm25_input = CONTEXT_FIELD if bm25 else None
        ranker, ranker_params = _hybrid_ranker(cfg)
        context_field = CONTEXT_FIELD if bm25_input == CONTEXT_FIELD else None
        with quiet_lite_timestamps():
            store = RagMilvusVectorStore(  # type: ignore[call-arg]  # pydantic plugin vs. base __init__
                retry_seconds=settings.timeout,
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
                    BM25BuiltInFunction(
                        input_field_names=bm25_input or TEXT_FIELD,
                        output_field_names=SPARSE_FIELD,
                    )
                    if bm25
                    else None
                ),
                # A new collection's contextual-text field, analysed for BM25.
                scalar_field_names=[CONTEXT_FIELD] if context_field else None,
                scalar_field_types=[DataType.VARCHAR] if context_field else None,
                hybrid_ranker=ranker,
                hybrid_ranker_params=ranker_params,
                context_field=context_field,
                # A search returns what LlamaIndex rebuilds a node from (the node's JSON
                # holds its metadata), not every field: not the vectors, not the flat
                # metadata copies (~1.5 ms of an 8 ms Lite search). A foreign collection
                # has no node JSON: all of its fields, as LlamaIndex's default.
                output_fields=NODE_FIELDS if not exists or stored is not None else [],
            )
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
