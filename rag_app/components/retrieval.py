"""Retrieval: dense, BM25 or hybrid search in Milvus, filters pushed down, then postprocessing.

The retriever is LlamaIndex's own ``VectorIndexRetriever`` over ``MilvusVectorStore``: the
query mode selects dense search, Milvus's built-in BM25 full-text search, or both fused by
Milvus (RRF or weighted). Metadata filters become Milvus filter expressions, evaluated in
Milvus before ranking. The postprocessors (LlamaIndex node postprocessors) merge overlapping
neighbours of one document, rerank with a cross-encoder, and cut to ``top_k``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.retrievers import BaseRetriever, VectorIndexRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
from llama_index.core.vector_stores.types import (
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from rag_app.components.milvus_expr import (
    ALL_ROWS,
    filter_keys,
    operand,
    render_filters,
    string_literal,
)
from rag_app.config import RagConfig
from rag_app.errors import RagAppError, first_line

_MODES = {
    "dense": VectorStoreQueryMode.DEFAULT,
    "hybrid": VectorStoreQueryMode.HYBRID,
    "sparse": VectorStoreQueryMode.TEXT_SEARCH,
}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_filters(specs: Sequence[str]) -> MetadataFilters | None:
    """``["source=reference/*", "doc_type=markdown"]`` as filters Milvus evaluates (AND).

    ``key=value`` matches exactly; a value ending in ``*`` matches by prefix. Any other
    character is literal (quotes, backslashes, ``%`` and ``_`` included).
    """
    filters = []
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key) or not value:
            raise RagAppError(
                f"bad filter {spec!r}: write KEY=VALUE or KEY=PREFIX* "
                "(e.g. source=reference/* or doc_type=markdown)"
            )
        string_literal(value)  # undecodable bytes: refused now, before any model loads
        if value.endswith("*"):
            filters.append(
                MetadataFilter(key=key, value=value[:-1], operator=FilterOperator.TEXT_MATCH)
            )
        else:
            filters.append(MetadataFilter(key=key, value=value, operator=FilterOperator.EQ))
    return MetadataFilters(filters=filters) if filters else None


class PostprocessedRetriever(BaseRetriever):
    """A retriever followed by node postprocessors: what the query engine retrieves, usable
    on its own (a ``RetrieverQueryEngine``, an agent tool, an evaluation)."""

    def __init__(
        self, retriever: BaseRetriever, postprocessors: Sequence[BaseNodePostprocessor]
    ) -> None:
        super().__init__()
        self.retriever = retriever
        self.postprocessors = list(postprocessors)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        nodes = self.retriever.retrieve(query_bundle)
        for stage in self.postprocessors:
            nodes = stage.postprocess_nodes(nodes, query_bundle)
        return nodes

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """Search Milvus without blocking the event loop; the postprocessors (model and
        Milvus calls among them) run in a worker thread."""
        nodes = await self.retriever.aretrieve(query_bundle)
        for stage in self.postprocessors:
            nodes = await asyncio.to_thread(stage.postprocess_nodes, nodes, query_bundle)
        return nodes


def build_retriever(
    cfg: RagConfig,
    index: VectorStoreIndex,
    *,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
    embed_model: BaseEmbedding | None = None,
) -> PostprocessedRetriever:
    """The configured retrieval: Milvus search for candidates, then the postprocessors.

    With ``retrieval.abstain_below`` set, it returns no chunks at all when no chunk is
    relevant enough (see :class:`RelevanceGate`), and the query engine abstains; the gate
    embeds questions with ``embed_model`` (the index's model: pass it, or it is loaded
    again from the settings).
    """
    stages = build_postprocessors(cfg, top_k)
    expr = search_filter(index.vector_store, filters)
    if cfg.retrieval.abstain_below is not None:
        if embed_model is None:
            from rag_app.components.embedding import build_embed_model

            embed_model = build_embed_model(cfg)
        gate = RelevanceGate(
            threshold=cfg.retrieval.abstain_below,
            store=index.vector_store,
            embed_model=embed_model,
            expr=expr,
        )
        stages.insert(0, gate)
    return PostprocessedRetriever(_search(cfg, index, top_k=top_k, expr=expr), stages)


def search_filter(store: Any, filters: MetadataFilters | None) -> str:
    """``filters`` as the Milvus expression a search runs with ("" for none), rendered by
    :mod:`rag_app.components.milvus_expr` rather than by LlamaIndex's Milvus store, which
    writes values with only single quotes escaped. A key no chunk has would silently match
    nothing: it is refused, naming the keys the collection has."""
    if filters is None or not filters.filters:
        return ""
    expr = render_filters(filters)
    _check_keys(store, filter_keys(filters))
    return expr


def _check_keys(store: Any, keys: list[str]) -> None:
    from pymilvus import MilvusException

    client, name = getattr(store, "client", None), getattr(store, "collection_name", None)
    if client is None or name is None or not keys:
        return
    try:
        fields = client.describe_collection(name).get("fields", [])
        known = {f["name"] for f in fields if int(f.get("type", 0)) < 100}  # not vectors
        for row in client.query(name, filter=ALL_ROWS, output_fields=["$meta"], limit=100):
            known.update(row)
        unknown = [
            key for key in keys
            if key not in known
            and not client.query(name, filter=f"exists {operand(key)}", output_fields=[], limit=1)
        ]  # fmt: skip
    except MilvusException:  # an older server without these queries: no check
        return
    if unknown:
        shown = ", ".join(sorted(key for key in known if not key.startswith("_")))
        plural = "s" if len(unknown) > 1 else ""
        raise RagAppError(
            f"no chunk in collection {name!r} has the metadata key{plural} "
            f"{', '.join(map(repr, unknown))}, so the filter would match nothing "
            f"(keys there: {shown})"
        )


def _search(
    cfg: RagConfig, index: VectorStoreIndex, *, top_k: int | None = None, expr: str = ""
) -> VectorIndexRetriever:
    """The configured Milvus search, returning the candidates the postprocessors cut down."""
    settings = cfg.retrieval
    store = index.vector_store
    if settings.mode != "dense" and not getattr(store, "enable_sparse", False):
        collection = getattr(store, "collection_name", cfg.milvus.collection)
        raise RagAppError(
            f"retrieval.mode = {settings.mode!r} needs BM25, but collection {collection!r} "
            "was created without it (ingest into a new milvus.collection with "
            "milvus.bm25 = true, or use retrieval.mode = 'dense')"
        )
    wanted = top_k or settings.top_k
    narrows = settings.dedupe or settings.rerank != "none"
    fetch = max(settings.candidates, wanted) if narrows else wanted
    mode = VectorStoreQueryMode.MMR if settings.mmr else _MODES[settings.mode]
    kwargs: dict[str, Any] = {"mmr_threshold": settings.mmr_threshold} if settings.mmr else {}
    if expr:
        kwargs["string_expr"] = expr  # MilvusVectorStore.query's own filter expression
    return VectorIndexRetriever(
        index,
        similarity_top_k=fetch,
        sparse_top_k=fetch,
        hybrid_top_k=fetch,
        vector_store_query_mode=mode,
        vector_store_kwargs=kwargs,
    )


def build_postprocessors(cfg: RagConfig, top_k: int | None = None) -> list[BaseNodePostprocessor]:
    """Cut-off, merging of overlapping chunks, reranking, and the final cut to ``top_k``."""
    settings = cfg.retrieval
    wanted = top_k or settings.top_k
    stages: list[BaseNodePostprocessor] = [NewestVersion()]
    if settings.similarity_cutoff is not None:
        stages.append(SimilarityPostprocessor(similarity_cutoff=settings.similarity_cutoff))
    if settings.dedupe:
        stages.append(MergeOverlapping())
    if settings.rerank == "cross-encoder":
        stages.append(_cross_encoder(settings.rerank_model, wanted, cfg.embedding.device))
    stages.append(KeepTop(top_n=wanted))
    return stages


def _cross_encoder(model: str, top_n: int, device: str) -> BaseNodePostprocessor:
    """LlamaIndex's sentence-transformers reranker, keeping the ``top_n`` best candidates.

    A model that cannot be loaded is one line: transformers raises ``OSError`` for a
    missing model and ``ValueError`` for a folder without a readable ``config.json``.
    """
    from llama_index.core.postprocessor import SentenceTransformerRerank

    try:
        return SentenceTransformerRerank(
            model=model, top_n=top_n, device=None if device == "auto" else device
        )
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise RagAppError(
            f"cannot load reranker {model!r}: {reason} (download it first, e.g. "
            "`hf download MODEL`, point retrieval.rerank_model at a local folder, or set "
            "retrieval.rerank = 'none')"
        ) from None


class RelevanceGate(BaseNodePostprocessor):
    """No chunks unless some chunk's cosine similarity to the question reaches ``threshold``.

    Judged on the dense similarity of the best chunk in the (filtered) collection, whatever
    the retrieval mode: fused hybrid scores and BM25 scores have no fixed scale.
    """

    threshold: float
    store: Any = Field(exclude=True, description="the collection's vector store")
    embed_model: Any = Field(exclude=True, description="the model the collection was embedded with")
    expr: str = Field(default="", description="the search's Milvus filter expression")

    @classmethod
    def class_name(cls) -> str:
        return "RelevanceGate"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes or query_bundle is None:
            return nodes
        embedding = query_bundle.embedding or self.embed_model.get_query_embedding(
            query_bundle.query_str
        )
        kwargs = {"string_expr": self.expr} if self.expr else {}
        best = self.store.query(
            VectorStoreQuery(query_embedding=embedding, similarity_top_k=1), **kwargs
        )
        relevance = max(best.similarities or [0.0])
        return nodes if relevance >= self.threshold else []


class NewestVersion(BaseNodePostprocessor):
    """Chunks of one version per document: the newest written.

    Re-ingesting a changed document upserts its new chunks, then deletes the old version's
    remaining rows; a search in between can return chunks of both. Keeping the newest
    version's means a reader sees the old document or the new one, never a mix.
    """

    @classmethod
    def class_name(cls) -> str:
        return "NewestVersion"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        newest: dict[str, tuple[float, str]] = {}
        for node in nodes:
            metadata = node.node.metadata
            version = (float(metadata.get("written_at") or 0), str(metadata.get("doc_hash")))
            doc = node.node.ref_doc_id or ""
            newest[doc] = max(newest.get(doc, version), version)
        return [
            n for n in nodes
            if str(n.node.metadata.get("doc_hash")) == newest[n.node.ref_doc_id or ""][1]
        ]  # fmt: skip


class KeepTop(BaseNodePostprocessor):
    """The first ``top_n`` nodes: every stage before keeps them best first.

    Not re-sorted by score: scores of different retrieval modes are not on one scale.
    """

    top_n: int = Field(default=3, ge=1)

    @classmethod
    def class_name(cls) -> str:
        return "KeepTop"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        return nodes[: self.top_n]


class MergeOverlapping(BaseNodePostprocessor):
    """Merge retrieved chunks that are neighbours in one document into one passage.

    Neighbouring chunks share their overlap; sending both repeats it and spends two of the
    ``top_k`` slots on one passage. The merged node keeps the better score and the first
    chunk's id and metadata.
    """

    @classmethod
    def class_name(cls) -> str:
        return "MergeOverlapping"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        groups: dict[tuple[str, int], list[NodeWithScore]] = {}
        position: dict[str, tuple[str, int]] = {}
        for node in nodes:
            doc, number = _chunk_position(node)
            if number is None:
                groups[(node.node.node_id, -1)] = [node]
                continue
            neighbour = position.get(f"{doc}#{number - 1}") or position.get(f"{doc}#{number + 1}")
            key = neighbour or (doc, number)
            groups.setdefault(key, []).append(node)
            position[f"{doc}#{number}"] = key
        return [_merge(group) if len(group) > 1 else group[0] for group in groups.values()]


def _chunk_position(node: NodeWithScore) -> tuple[str, int | None]:
    doc, _, number = node.node.node_id.rpartition("#")
    return (doc, int(number)) if number.isdigit() else (node.node.node_id, None)


def _merge(group: list[NodeWithScore]) -> NodeWithScore:
    ordered = sorted(group, key=lambda n: _chunk_position(n)[1] or 0)
    text = ordered[0].node.get_content()
    for node in ordered[1:]:
        text = _join_overlapping(text, node.node.get_content())
    first = ordered[0].node
    merged = TextNode(
        id_=first.node_id,
        text=text,
        metadata=dict(first.metadata),
        excluded_embed_metadata_keys=list(first.excluded_embed_metadata_keys),
        excluded_llm_metadata_keys=list(first.excluded_llm_metadata_keys),
        relationships=dict(first.relationships),
    )
    return NodeWithScore(node=merged, score=max(n.score or 0.0 for n in group))


def _join_overlapping(left: str, right: str) -> str:
    """``left`` then ``right`` without the text they share (right's start, left's end)."""
    for size in range(min(len(left), len(right)), 0, -1):
        if left.endswith(right[:size]):
            return left + right[size:]
    return left + "\n" + right
