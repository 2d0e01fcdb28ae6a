"""Milvus Lite's BM25 scored with the whole collection's statistics, as a Milvus server does.

Written for milvus-lite 3.2.2 (:data:`WRITTEN_FOR`), whose BM25 search scores each source of
rows with statistics of its own: ``Collection._search_sparse`` (milvus_lite/engine/
collection.py) searches every flushed segment, then the in-memory memtable, each through a
``SparseInvertedIndex`` (milvus_lite/index/sparse_inverted.py) whose ``build`` counts that
source's rows, their average length and each term's document frequency, and merges the
scores as if they were comparable (its docstring's TODO says they are not). Rows written since
the collection was last flushed (by a later ``rag-app ingest`` into a Lite file, whose previous
process flushed on exit, or by any write since a Lite server started) form a corpus of their
own: a new document alone in it gets, for a word only it contains, an IDF of
log(1 + 0.5/1.5) = 0.29 instead of about 5, and ranks below documents that merely share a
common word with the question. Flushing does not help (the rows become a small segment with
the same statistics) and Lite has no compaction on demand (``ManualCompaction`` is a no-op).

A Milvus server (2.5 and later) does not have the problem: each shard's delegator keeps one
set of BM25 statistics over all its segments (``idfOracle``, internal/querynodev2/delegator/
idf_oracle.go) and scores every segment with it.

:func:`install` makes Lite do the same: every source of a BM25 search is scored with the row
count, average row length and per-term document frequencies summed over the collection's
segments (of every partition) and memtable, whatever the search's filter. As in a segment's
own statistics (and in the server's oracle, which has no path that subtracts deletions), a
segment's rows count until compaction rewrites it, rows deleted or replaced since included.

The same patch scores faster (:func:`bm25_top_k`): Lite's ``SparseInvertedIndex.search``
loops over every posting of every query term in Python, 20 ms per question over the Milvus
docs' 6,189 chunks and 107 ms over the Python docs' 21,900 (a sparse search's median on this
project's 2-core machine); the same sums in NumPy bring the whole sparse search to 7.8 and
17.1 ms, with identical ids, float32 scores and order of ties (the guard test compares them
with Lite's own scorer).

This module imports only milvus_lite (and NumPy, a dependency of milvus_lite) and the
standard library: scripts/milvus_server.py loads it into the Lite server process by its file
path, without rag_app's heavy imports.

:func:`accept_keepalive_pings` fixes a second difference, for a Lite file opened in this
process: milvus-lite's in-process gRPC server (``_build_server`` in milvus_lite/adapter/grpc/
server.py) takes gRPC's defaults for client pings, under which pymilvus's keepalive (a ping
every 10 s, even with no call in flight) earns a GOAWAY "too_many_pings" after about 30 idle
seconds, and the next client opened on that file (which shares the connection) fails with
"Fail connecting to server". A command that lasts seconds never meets it; ``rag-app serve``
does. A Milvus server accepts such pings; scripts/milvus_server.py gives its Lite server
process the same options (:data:`PING_OPTIONS`).
"""

from __future__ import annotations

import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

log = logging.getLogger(__name__)

WRITTEN_FOR = "3.2.2"
_PATCHED = "_rag_app_collection_bm25"
# What a Milvus server allows: pings as often as every 5 s, idle or not, without strikes.
PING_OPTIONS = (
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


class _PingTolerantGrpc:
    """milvus-lite's view of the ``grpc`` module: the same, but its servers accept pings."""

    def __init__(self, grpc: Any) -> None:
        self._grpc = grpc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc, name)

    def server(self, *args: Any, options: Any = (), **kwargs: Any) -> Any:
        return self._grpc.server(*args, options=[*options, *PING_OPTIONS], **kwargs)


def one_blas_thread() -> bool:
    """NumPy's BLAS (OpenBLAS in NumPy's wheels) on one thread in this process, where Milvus
    Lite runs its searches. Lite's dense search is NumPy matrix-vector products, too small to
    gain from BLAS threads; but after each, OpenBLAS's threads keep spinning for up to
    2^28 cycles (its ``THREAD_TIMEOUT``, about 0.1 s), and on a 2-core machine that took half
    the CPU from the question embedded next: 8.0 ms per question embedded between dense
    searches, 5.5 ms with one BLAS thread (4.0 ms with no search in between; the 137 Milvus
    docs questions, one run). The limit holds for the whole process: an application that
    wants BLAS threads for its own NumPy work can raise it again with threadpoolctl. False
    (nothing changed) without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=1, user_api="blas")
    return True


def accept_keepalive_pings() -> bool:
    """Make the gRPC servers that milvus-lite starts in this process from now on accept
    pymilvus's keepalive pings. Idempotent; False (nothing changed) without milvus-lite, or
    when its server module no longer builds servers through ``grpc.server``."""
    try:
        from milvus_lite.adapter.grpc import server as lite_server
    except ImportError:
        return False
    current = getattr(lite_server, "grpc", None)
    if isinstance(current, _PingTolerantGrpc):
        return True
    if current is None or not callable(getattr(current, "server", None)):
        log.warning("milvus-lite's gRPC server module changed: idle clients may be dropped "
                    "(rag_app.compat.milvus_lite was written for %s)", WRITTEN_FOR)  # fmt: skip
        return False
    lite_server.grpc = _PingTolerantGrpc(current)  # type: ignore[assignment]
    return True


@dataclass(frozen=True)
class CorpusStatistics:
    """BM25 statistics of a whole collection, for the terms of one search."""

    rows: int
    average_length: float
    document_frequency: dict[int, int]  # term hash -> rows containing it, every query term


_corpus: ContextVar[CorpusStatistics | None] = ContextVar("rag_app_bm25_corpus", default=None)


def install() -> bool:
    """Score Milvus Lite's BM25 searches in this process with collection-wide statistics,
    in NumPy (:func:`bm25_top_k`).

    Idempotent. Returns False, with a warning, when milvus-lite is not installed or lacks
    what the patch wraps (another version: see :data:`WRITTEN_FOR`); searches then work as
    that version does.
    """
    try:
        from milvus_lite.engine.collection import Collection
        from milvus_lite.index.sparse_inverted import SparseInvertedIndex
    except ImportError:
        return False
    if getattr(Collection._search_sparse, _PATCHED, False):
        return True
    needed = [
        (Collection, "_search_sparse"),
        (Collection, "_prepare_sparse_queries"),
        (Collection, "_read_snapshot"),
        (SparseInvertedIndex, "search"),
    ]
    missing = [f"{owner.__name__}.{name}" for owner, name in needed if not hasattr(owner, name)]
    if missing:
        log.warning(
            "milvus-lite lacks %s: BM25 scores stay per segment (rag_app.compat.milvus_lite "
            "was written for milvus-lite %s)", ", ".join(missing), WRITTEN_FOR,
        )  # fmt: skip
        return False

    search_sources = Collection._search_sparse
    score = SparseInvertedIndex.search

    def _search_sparse(
        self: Any, query_vectors: list[Any], vector_field: str, top_k: int, metric_type: str,
        *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        search = partial(
            search_sources, self, query_vectors, vector_field, top_k, metric_type, *args, **kwargs
        )
        if metric_type != "BM25":
            return search()
        queries = self._prepare_sparse_queries(query_vectors, vector_field)
        token = _corpus.set(corpus_statistics(self, vector_field, queries))
        try:
            return search()
        finally:
            _corpus.reset(token)

    def search(self: Any, query_sparse_vectors: Any, top_k: int, valid_mask: Any = None) -> Any:
        corpus = _corpus.get()
        if corpus is None:
            corpus = CorpusStatistics(self.doc_count, self.avgdl, self._df)
        return bm25_top_k(self, query_sparse_vectors, top_k, valid_mask, corpus)

    search.__wrapped__ = score  # type: ignore[attr-defined]  # Lite's own, for the guard test
    setattr(_search_sparse, _PATCHED, True)
    Collection._search_sparse = _search_sparse
    SparseInvertedIndex.search = search
    return True


def bm25_top_k(
    index: Any, queries: list[dict[int, float]], top_k: int, valid_mask: Any,
    corpus: CorpusStatistics,
) -> tuple[Any, Any]:  # fmt: skip
    """``SparseInvertedIndex.search`` of milvus-lite 3.2.2 with NumPy, scored with ``corpus``'s
    statistics: the same BM25 sums (float32, added term by term in the query's order), the
    same ties (the row first reached comes first), the same result arrays. Lite's own loops
    over every posting of every query term in Python (figures in the module's docstring).
    """
    import numpy as np
    from milvus_lite.index.sparse_common import empty_results, validate_mask

    valid_mask = validate_mask(valid_mask, len(index._doc_lengths))
    ids_out, distances_out = empty_results(len(queries), top_k)
    if corpus.rows == 0:
        return ids_out, distances_out
    k1, b, rows = index.k1, index.b, corpus.rows
    average = corpus.average_length if corpus.average_length > 0 else 1.0
    lengths = index._doc_lengths
    unreached = np.iinfo(np.int64).max
    for qi, query in enumerate(queries):
        scores = np.zeros(len(lengths), dtype=lengths.dtype)
        reached = np.full(len(lengths), unreached, dtype=np.int64)
        count = 0
        for term, weight in (query or {}).items():
            postings = _postings(index, term)
            if postings is None:
                continue
            ids, tf = postings
            if valid_mask is not None:
                keep = valid_mask[ids]
                ids, tf = ids[keep], tf[keep]
            if not len(ids):
                continue
            df = corpus.document_frequency[term]
            idf = math.log((rows - df + 0.5) / (df + 0.5) + 1.0)
            # Lite's expression, on float32 lengths: NumPy computes it in float32 as there.
            norm = (tf * (k1 + 1.0)).astype(lengths.dtype) / (
                tf.astype(lengths.dtype) + k1 * (1.0 - b + b * lengths[ids] / average)
            )
            scores[ids] += idf * norm * weight
            first = ids[reached[ids] == unreached]
            reached[first] = np.arange(count, count + len(first))
            count += len(first)
        if not count:
            continue
        hit = np.flatnonzero(reached != unreached)
        best = hit[np.lexsort((reached[hit], -scores[hit]))][:top_k]
        ids_out[qi, : len(best)] = best
        distances_out[qi, : len(best)] = -scores[best]
    return ids_out, distances_out


def _postings(index: Any, term: int) -> tuple[Any, Any] | None:
    """A term's posting list as (row ids, term frequencies) arrays, made once per index
    build (``build`` replaces ``_posting_lists``; a segment's index is otherwise unchanged)."""
    import numpy as np

    lists = index._posting_lists
    cache = index.__dict__.get("_rag_app_postings")
    if cache is None or cache[0] is not lists:
        cache = (lists, {})
        index.__dict__["_rag_app_postings"] = cache
    arrays = cache[1].get(term)
    if arrays is None:
        posting = lists.get(term)
        if not posting:
            return None
        ids, tf = zip(*posting, strict=True)
        arrays = (np.asarray(ids, dtype=np.int64), np.asarray(tf, dtype=np.float64))
        cache[1][term] = arrays
    return arrays


def corpus_statistics(
    collection: Any, field: str, queries: list[dict[int, float]]
) -> CorpusStatistics:
    """Rows, average length and the query terms' document frequencies of a BM25 field, over
    all of ``collection``'s segments and its memtable."""
    from milvus_lite.analyzer.sparse import bytes_to_sparse

    terms = {term for query in queries for term in query}
    frequency = dict.fromkeys(terms, 0)
    rows, length = 0, 0.0
    segments, _ = collection._read_snapshot()
    for segment in segments:
        index = _segment_index(collection, segment, field)
        if index is not None:
            rows += index.doc_count
            length += index.avgdl * index.doc_count
            for term in terms:
                frequency[term] += index._df.get(term, 0)
    for _pk, _seq, record in collection._memtable.active_record_snapshots():
        raw = record.get(field)
        vector = bytes_to_sparse(raw) if isinstance(raw, bytes) else (raw or {})
        rows += 1
        length += sum(vector.values())
        for term in terms.intersection(vector):
            frequency[term] += 1
    return CorpusStatistics(rows, length / rows if rows else 0.0, frequency)


def _segment_index(collection: Any, segment: Any, field: str) -> Any:
    """The segment's BM25 index, built and cached as ``Collection._search_sparse`` does (which
    then reuses it); None for an empty segment."""
    from milvus_lite.analyzer.sparse import bytes_to_sparse
    from milvus_lite.index.sparse_factory import create_sparse_index, sparse_index_matches

    table = segment.table
    if table is None or len(table) == 0:
        return None
    spec = collection._index_specs.get(field)
    params = spec.build_params if spec else {}
    index = segment.sparse_indexes.get(field)
    if not sparse_index_matches(index, "BM25", params):
        index = create_sparse_index("BM25", params)
        index.build(
            [
                bytes_to_sparse(raw) if isinstance(raw, bytes) else (raw or {})
                for raw in table.column(field).to_pylist()
            ]
        )
        segment.sparse_indexes[field] = index
    return index
