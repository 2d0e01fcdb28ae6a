"""Retrieval quality of each mode, side by side, from one run over one ingested corpus.

    .venv/bin/python scripts/bench_retrieval.py [--corpus DIR] [--qa eval/milvus-docs/dev.jsonl]
        [-k 5]
        [--rerank-model PATH]

Ingests the corpus (the Milvus documentation by default) once into a fresh Milvus Lite file
with configs/cpu-small.toml, then scores dense, sparse (BM25), hybrid with RRF fusion and
hybrid with weighted fusion on the QA file: hit@1, hit@k, MRR and nDCG@k per document, as
``rag-app eval`` does. With ``--rerank-model`` (a cross-encoder folder), hybrid + rerank too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.vector_stores.types import VectorStoreQuery
from llama_index.vector_stores.milvus import MilvusVectorStore

from rag_app import build_embed_model, build_index, build_vector_store, ingest_path, load_config
from rag_app.components.retrieval import build_retriever
from rag_app.pipelines.evaluate import CHUNKS_PER_DOCUMENT, evaluate_retrieval, load_qa

REPO = Path(__file__).resolve().parent.parent


def _best_similarity(embed_model: BaseEmbedding, store: MilvusVectorStore, question: str) -> float:
    query = VectorStoreQuery(
        query_embedding=embed_model.get_query_embedding(question), similarity_top_k=1
    )
    return max(store.query(query).similarities or [0.0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs")
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--qa", type=Path, default=REPO / "eval/milvus-docs/dev.jsonl")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--rerank-model", help="a cross-encoder (local folder) for hybrid+rerank")
    parser.add_argument("--out", type=Path, help="write the scores as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    uri = str(Path(tempfile.mkdtemp(prefix="bench-retrieval-")) / "milvus.db")
    cfg = load_config(args.config, milvus__uri=uri)
    qa = load_qa(args.qa)
    embed_model = build_embed_model(cfg)
    store = build_vector_store(cfg, embed_model)
    report = ingest_path(cfg, args.corpus, embed_model=embed_model, vector_store=store)
    print(f"{args.corpus}: {report.summary()}", flush=True)

    variants: dict[str, dict[str, object]] = {
        "dense": {"mode": "dense"},
        "sparse (BM25)": {"mode": "sparse"},
        "hybrid, RRF": {"mode": "hybrid", "fusion": "rrf"},
        "hybrid, weighted": {"mode": "hybrid", "fusion": "weighted"},
    }
    if args.rerank_model:
        variants["hybrid, RRF + rerank"] = {
            "mode": "hybrid",
            "fusion": "rrf",
            "rerank": "cross-encoder",
            "rerank_model": args.rerank_model,
        }
    results = {}
    print(f"\n{len(qa)} questions in {args.qa}, documents ranked from the best chunks")
    for name, settings in variants.items():
        variant = cfg.model_copy(deep=True)
        for key, value in settings.items():
            setattr(variant.retrieval, key, value)
        # Fusion settings live on the store: rebuild it for each variant.
        variant_store = build_vector_store(variant, embed_model)
        variant_index = build_index(variant, embed_model=embed_model, vector_store=variant_store)
        retriever = build_retriever(variant, variant_index, top_k=CHUNKS_PER_DOCUMENT * args.k)
        started = time.perf_counter()
        scores = evaluate_retrieval(qa, retriever.retrieve, k=args.k)
        per_query = (time.perf_counter() - started) / max(scores.questions, 1) * 1000
        results[name] = scores
        print(f"{name:<22}{scores.row()}  {per_query:.0f} ms/query", flush=True)
    print(
        "\nabstention (retrieval.abstain_below): the best chunk's cosine similarity to "
        "each question, answerable vs unanswerable"
    )
    best = {item.question: _best_similarity(embed_model, store, item.question) for item in qa}
    answerable = sorted(best[i.question] for i in qa if i.sources)
    unanswerable = sorted(best[i.question] for i in qa if not i.sources)
    print(f"answerable   ({len(answerable)}): " + " ".join(f"{v:.2f}" for v in answerable))
    print(f"unanswerable ({len(unanswerable)}): " + " ".join(f"{v:.2f}" for v in unanswerable))
    for threshold in (0.4, 0.45, 0.5, 0.55, 0.6):
        right = sum(v < threshold for v in unanswerable)
        wrong = sum(v < threshold for v in answerable)
        print(
            f"abstain_below = {threshold:.2f}: abstains on {right}/{len(unanswerable)} "
            f"unanswerable, {wrong}/{len(answerable)} answerable"
        )
    if args.out:
        args.out.write_text(
            json.dumps({name: s.to_json() for name, s in results.items()}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
