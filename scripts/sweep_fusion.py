"""Hybrid fusion settings swept in seconds on the ``dev`` split, from one dense and one BM25
search per question.

    .venv/bin/python scripts/sweep_fusion.py [--corpus milvus-docs|python-docs|all]
        [--set SECTION.KEY=VALUE ...]

``scripts/bench_retrieval.py`` re-runs every question through Milvus for each setting; this
asks Milvus once per question for the dense and the BM25 candidates (60 of each), then fuses
them in Python for every setting: Milvus's weighted ranker (its normalisation: arctan for
inner product and BM25) and RRF, each at several sub-search depths (Milvus searches each side
for the hybrid's ``candidates``), and LlamaIndex ``QueryFusionRetriever``'s two score-based
modes (min-max, and mean ± 3 standard deviations). It first checks that its weighted fusion
ranks exactly as Milvus's own hybrid search at the configured weight, and says for how many
questions it does. Scores are per document from the best ``4 * k`` chunks, as in the
benchmark. Only ``dev``: choose here, then report ``test`` with bench_retrieval.py.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench_retrieval as bench

Hit = tuple[str, str, float]  # chunk id, document, score
Fusion = Callable[[dict[str, list[Hit]]], list[Hit]]
DEPTH = 60  # candidates of each side fetched once; every setting fuses from these


def milvus_weighted(dense_weight: float, depth: int) -> Fusion:
    """Milvus's WeightedRanker with normalised scores: IP -> 0.5 + atan(s)/pi, BM25 ->
    2 atan(s)/pi, then the weighted sum over both sides' first ``depth`` hits."""
    dense = lambda _rank, s: dense_weight * (0.5 + math.atan(s) / math.pi)  # noqa: E731
    sparse = lambda _rank, s: (1 - dense_weight) * 2 * math.atan(s) / math.pi  # noqa: E731
    return lambda hits: _summed((hits["dense"][:depth], dense), (hits["sparse"][:depth], sparse))


def rrf(k: int, depth: int) -> Fusion:
    """Milvus's RRFRanker: the sum of 1 / (k + rank) over both sides' first ``depth`` hits."""
    weigh = lambda rank, _s: 1 / (k + rank)  # noqa: E731
    return lambda hits: _summed((hits["dense"][:depth], weigh), (hits["sparse"][:depth], weigh))


def score_fusion(dense_weight: float, depth: int, spread: bool) -> Fusion:
    """LlamaIndex's relative_score (min-max per side) or dist_based_score (mean ± 3 sd)."""

    def scaled(hits: list[Hit], weight: float) -> tuple[list[Hit], Callable[[int, float], float]]:
        scores = [h[2] for h in hits] or [0.0]
        if spread:
            mean, sd = statistics.fmean(scores), statistics.pstdev(scores)
            low, high = mean - 3 * sd, mean + 3 * sd
        else:
            low, high = min(scores), max(scores)
        return hits, lambda _rank, s: weight * ((s - low) / (high - low) if high > low else 1.0)

    return lambda hits: _summed(
        scaled(hits["dense"][:depth], dense_weight),
        scaled(hits["sparse"][:depth], 1 - dense_weight),
    )


def _summed(*sides: tuple[list[Hit], Callable[[int, float], float]]) -> list[Hit]:
    """Each chunk's weights summed over the sides that found it, best first."""
    total: dict[str, float] = defaultdict(float)
    document: dict[str, str] = {}
    for hits, weigh in sides:
        for rank, (cid, doc, score) in enumerate(hits, 1):
            total[cid] += weigh(rank, score)
            document[cid] = doc
    return sorted(((c, document[c], s) for c, s in total.items()), key=lambda h: -h[2])


def settings(dense_weight: float, candidates: int) -> dict[str, Fusion]:
    grid: dict[str, Fusion] = {}
    for depth in sorted({10, candidates, 2 * candidates}):
        for weight in (0.5, 0.6, 0.7, 0.8, 0.9):
            grid[f"milvus weighted {weight}, depth {depth}"] = milvus_weighted(weight, depth)
        for k in (10, 60):
            grid[f"milvus rrf k={k}, depth {depth}"] = rrf(k, depth)
    for depth in (candidates, DEPTH):
        for weight in (0.5, 0.6, 0.7, 0.8):
            grid[f"min-max {weight}, depth {depth}"] = score_fusion(weight, depth, spread=False)
            grid[f"mean±3sd {weight}, depth {depth}"] = score_fusion(weight, depth, spread=True)
    return grid


def candidates_of(
    cfg: Any, embed_model: Any, questions: Sequence[str], fetch: int
) -> list[dict[str, list[Hit]]]:
    """Per question: dense and BM25 hits (DEPTH each), and Milvus's own hybrid ranking."""
    from llama_index.core.vector_stores.types import VectorStoreQuery
    from llama_index.core.vector_stores.types import VectorStoreQueryMode as Mode

    from rag_app import build_vector_store

    store = build_vector_store(cfg, embed_model)
    out = []
    for question in questions:
        embedding = embed_model.get_query_embedding(question)
        hits = {}
        for side, mode, limit in (
            ("dense", Mode.DEFAULT, DEPTH), ("sparse", Mode.TEXT_SEARCH, DEPTH),
            ("milvus", Mode.HYBRID, fetch),
        ):  # fmt: skip
            query = VectorStoreQuery(
                query_embedding=embedding, query_str=question, mode=mode,
                similarity_top_k=limit, sparse_top_k=limit, hybrid_top_k=limit,
            )  # fmt: skip
            result = store.query(query)
            hits[side] = [
                (node.node_id, str(node.metadata.get("source")), float(score))
                for node, score in zip(result.nodes or [], result.similarities or [], strict=True)
            ]
        out.append(hits)
    return out


def documents(hits: Sequence[Hit], k: int) -> list[str]:
    ranked: list[str] = []
    for _cid, doc, _score in hits[: 4 * k]:
        if doc not in ranked:
            ranked.append(doc)
    return ranked[:k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="all", help="milvus-docs, python-docs or all")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a rag_app setting for the ingest (repeatable)")  # fmt: skip
    args = parser.parse_args()
    bench.quiet_logs()
    from rag_app.pipelines.evaluate import load_qa, score

    corpora = ["milvus-docs", "python-docs"] if args.corpus == "all" else [args.corpus]
    workdir = Path(tempfile.mkdtemp(prefix="sweep-fusion-"))
    results: dict[str, dict[str, Any]] = {}
    for corpus in corpora:
        root, include, exclude = bench.corpus_spec(corpus)
        items = [item for item in load_qa(bench.EVAL / corpus / "dev.jsonl") if item.sources]
        uri = str(workdir / f"{corpus}.db")
        cfg, embed_model = bench.rag_app_pipeline(
            root, include, exclude, uri, bench.parse_sets(args.set)
        )
        cfg.retrieval.mode, cfg.retrieval.fusion = "hybrid", "weighted"
        fetch = max(cfg.retrieval.candidates, 4 * args.k)  # what bench_retrieval's rows fetch
        hits = candidates_of(cfg, embed_model, [item.question for item in items], fetch)
        check = milvus_weighted(cfg.retrieval.dense_weight, fetch)
        same = sum(
            [h[0] for h in check(q)[: len(q["milvus"])]] == [h[0] for h in q["milvus"]]
            for q in hits
        )
        print(f"  {corpus}: weighted {cfg.retrieval.dense_weight} fused here ranks as Milvus's "
              f"hybrid search for {same} of {len(hits)} questions", flush=True)  # fmt: skip
        grid = settings(cfg.retrieval.dense_weight, cfg.retrieval.candidates)
        results[corpus] = {
            name: score(items, [documents(fuse(q), args.k) for q in hits], args.k)
            for name, fuse in grid.items()
        }
    print(f"\ndev split, k={args.k}: hit@1 / hit@{args.k} / MRR per corpus; mean MRR\n")
    print("| fusion | " + " | ".join(corpora) + " | mean MRR |")
    print("|---" * (len(corpora) + 2) + "|")
    for name in next(iter(results.values())):
        cells = [results[c][name] for c in corpora]
        row = " | ".join(f"{s.hit_at_1:.3f} / {s.hit_at_k:.3f} / {s.mrr:.3f}" for s in cells)
        print(f"| {name} | {row} | {statistics.fmean(s.mrr for s in cells):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
