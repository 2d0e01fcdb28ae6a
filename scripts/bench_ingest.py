"""Ingestion benchmark: rag_app's ingest against bare forward passes and naive LlamaIndex.

    .venv/bin/python scripts/bench_ingest.py [--corpus DIR] [--qa eval/milvus-docs/test.jsonl]
        [--limit N]

Measured in one run, on the same chunks and the same embedding model (configs/cpu-small.toml):

1. bare forward passes of the model over every chunk, in fp32, bf16 and int8 (the int8
   ONNX export, made first if missing: its export time is not counted), and the
   retrieval quality (hit@5, MRR on the QA file) of each precision's vectors by exact
   search, so precision is the only difference;
2. the fastest precision whose hit@5 is within 0.01 of fp32's;
3. ``rag-app ingest`` of the corpus at that precision into a fresh Milvus Lite file, then
   again with nothing changed;
4. a naive fp32 LlamaIndex pipeline: ``SimpleDirectoryReader`` and
   ``VectorStoreIndex.from_documents`` into Milvus Lite, the same splitter settings.

It prints the figures side by side and the three targets: (a) ingest / bare forward
passes at the same precision <= 1.15, (b) ingest chunks/s >= 2x naive, (c) re-ingest of the
unchanged corpus <= 5% of the first. Whole corpus: ~25 minutes on 2 CPU cores.

With ``--server URL`` (an OpenAI-compatible embedding server serving the same model, e.g.
``python -m vllm.entrypoints.openai.api_server --model .models/all-MiniLM-L6-v2 --runner
pooling --served-model-name all-MiniLM-L6-v2 --dtype bfloat16 --port 8001``) it adds
5. ``rag-app ingest`` with ``embedding.mode = "server"`` (``--in-flight`` batches at once,
   default 2) into another fresh file, the retrieval quality of the server's vectors, and
   (d) in-process ingest chunks/s / server-mode chunks/s at the server's precision
   (``--server-precision``, default bf16) <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.vector_stores.milvus import MilvusVectorStore

from rag_app.components.chunking import chunk_documents, embed_text
from rag_app.components.embedding import build_embed_model, token_counter
from rag_app.components.readers import PARSERS, discover, load_documents
from rag_app.components.vector_store import quiet_lite_timestamps
from rag_app.config import RagConfig, load_config
from rag_app.pipelines.evaluate import (
    CHUNKS_PER_DOCUMENT,
    QAItem,
    RetrievalScores,
    evaluate_retrieval,
    load_qa,
)
from rag_app.pipelines.ingest import ingest_path

REPO = Path(__file__).resolve().parent.parent
QUALITY_TOLERANCE = 0.01  # hit@5 a faster precision may lose against fp32
PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class Timing:
    label: str
    chunks: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


def _with(cfg: RagConfig, **sections: dict[str, object]) -> RagConfig:
    data = cfg.model_dump()
    for name, values in sections.items():
        data[name].update(values)
    return RagConfig.model_validate(data)


def corpus_chunks(cfg: RagConfig, corpus: Path, limit: int | None) -> tuple[list[TextNode], Path]:
    """The chunks rag_app makes of the corpus (its first ``limit`` files, in a copy)."""
    files = discover(corpus)
    if limit:
        subset = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
        for file in files[:limit]:
            target = subset / file.relative_to(corpus)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())
        corpus, files = subset, discover(subset)
    documents = [doc for _, doc in load_documents(files, corpus) if not isinstance(doc, Exception)]
    model = build_embed_model(cfg)
    nodes = chunk_documents(cfg, documents, token_counter(model))
    return [node for node in nodes if isinstance(node, TextNode)], corpus


def bare_forward(cfg: RagConfig, texts: list[str]) -> tuple[Timing, np.ndarray, object]:
    """Embedding calls alone, length-sorted batches of ``batch_size``: the floor for ingest."""
    model = build_embed_model(cfg)
    model.get_text_embedding_batch(texts[:8])  # warm-up: first-call allocations
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors: list[list[float]] = [[] for _ in texts]
    size = cfg.embedding.batch_size
    started = time.perf_counter()
    for start in range(0, len(order), size):
        batch = order[start : start + size]
        embedded = model.get_text_embedding_batch([texts[i] for i in batch])
        for i, vector in zip(batch, embedded, strict=True):
            vectors[i] = vector
    seconds = time.perf_counter() - started
    label = f"bare forward passes, {cfg.embedding.precision}"
    return Timing(label, len(texts), seconds), np.asarray(vectors, dtype=np.float32), model


def exact_search_scores(
    model: object, nodes: list[TextNode], vectors: np.ndarray, qa: list[QAItem], k: int
) -> RetrievalScores:
    """Retrieval quality of a set of chunk vectors, by exact inner-product search."""

    def retrieve(question: str) -> list[NodeWithScore]:
        query = np.asarray(model.get_query_embedding(question), dtype=np.float32)  # type: ignore[attr-defined]
        scores = vectors @ query
        top = np.argsort(-scores)[: CHUNKS_PER_DOCUMENT * k]
        return [NodeWithScore(node=nodes[i], score=float(scores[i])) for i in top]

    return evaluate_retrieval(qa, retrieve, k)


def naive_llamaindex(cfg: RagConfig, corpus: Path, workdir: Path, embed_model: object) -> Timing:
    """What a hand-rolled notebook does: read, split, embed and insert with the defaults."""
    started = time.perf_counter()
    documents = SimpleDirectoryReader(
        str(corpus), recursive=True, required_exts=sorted(PARSERS)
    ).load_data()
    for document in documents:  # embed the text only, as rag_app does
        document.excluded_embed_metadata_keys = list(document.metadata)
    with quiet_lite_timestamps():
        store = MilvusVectorStore(
            uri=str(workdir / "naive.db"),
            dim=len(embed_model.get_text_embedding("probe")),  # type: ignore[attr-defined]
            overwrite=True,
        )
    splitter = SentenceSplitter(
        chunk_size=cfg.chunking.chunk_size,
        chunk_overlap=cfg.chunking.chunk_overlap,
        tokenizer=list,
        include_metadata=False,
    )
    index = VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed_model,  # type: ignore[arg-type]
        transformations=[splitter],
    )
    seconds = time.perf_counter() - started
    del index
    (count,) = store.client.query(store.collection_name, output_fields=["count(*)"])
    return Timing("naive LlamaIndex, fp32", int(count["count(*)"]), seconds)


def server_mode(
    args: argparse.Namespace,
    base: RagConfig,
    workdir: Path,
    corpus: Path,
    nodes: list[TextNode],
    models: dict[str, object],
    qa: list[QAItem],
    quality: dict[str, RetrievalScores],
    chosen: str,
    first: Timing,
) -> tuple[Timing, Timing]:
    """An in-process ingest at the server's precision (``first`` if that is the one used)
    and a server-mode ingest of the same corpus; the server's vectors' quality goes into
    ``quality["server"]``."""
    precision = args.server_precision
    local = first
    if precision != chosen:
        cfg = _with(base, embedding={"precision": precision},
                    milvus={"uri": str(workdir / f"rag_app_{precision}.db")})  # fmt: skip
        report = ingest_path(cfg, corpus, embed_model=models[precision], progress=False)  # type: ignore[arg-type]
        local = Timing(f"rag_app ingest, {precision}", report.chunks, report.seconds)
    cfg = _with(
        base,
        embedding={"precision": precision, "mode": "server", "api_base": args.server,
                   "max_in_flight": args.in_flight},
        milvus={"uri": str(workdir / "server.db")},
    )  # fmt: skip
    model = build_embed_model(cfg)
    texts = [embed_text(node) for node in nodes]  # what ingest embeds, context included
    model.get_text_embedding_batch(texts[:8])  # warm-up, as for the bare passes
    report = ingest_path(cfg, corpus, embed_model=model, progress=False)
    served = Timing(f"ingest, server, {args.in_flight} in flight", report.chunks, report.seconds)
    print(f"  {served.label}: {served.seconds:.1f} s", flush=True)
    vectors = np.asarray(model.get_text_embedding_batch(texts), dtype=np.float32)
    quality["server"] = exact_search_scores(model, nodes, vectors, qa, args.k)
    return local, served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs")
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--qa", type=Path, default=REPO / "eval/milvus-docs/test.jsonl")
    parser.add_argument("--limit", type=int, help="only the first N files (a quick run)")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--server", help="an embedding server's /v1 URL serving the model")
    parser.add_argument("--server-precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--in-flight", type=int, default=2, help="server mode: batches at once")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    base = _with(load_config(args.config), milvus={"uri": str(workdir / "rag_app.db")})
    qa = load_qa(args.qa)
    nodes, corpus = corpus_chunks(base, args.corpus, args.limit)
    texts = [embed_text(node) for node in nodes]  # what ingest embeds, context included
    print(f"corpus {corpus}: {len(texts)} chunks; QA {args.qa}: {len(qa)} questions", flush=True)

    timings: dict[str, Timing] = {}
    quality: dict[str, RetrievalScores] = {}
    models: dict[str, object] = {}
    for precision in PRECISIONS:
        cfg = _with(base, embedding={"precision": precision})
        timings[precision], vectors, models[precision] = bare_forward(cfg, texts)
        quality[precision] = exact_search_scores(models[precision], nodes, vectors, qa, args.k)
        print(f"  {timings[precision].label}: {timings[precision].seconds:.1f} s", flush=True)

    keeps = [
        p for p in PRECISIONS if quality[p].hit_at_k >= quality["fp32"].hit_at_k - QUALITY_TOLERANCE
    ]
    chosen = min(keeps, key=lambda p: timings[p].seconds)
    cfg = _with(base, embedding={"precision": chosen})

    report = ingest_path(cfg, corpus, embed_model=models[chosen], progress=False)  # type: ignore[arg-type]
    first = Timing(f"rag_app ingest, {chosen}", report.chunks, report.seconds)
    print(f"  {first.label}: {first.seconds:.1f} s", flush=True)
    again = ingest_path(cfg, corpus, embed_model=models[chosen], progress=False)  # type: ignore[arg-type]
    second = Timing("rag_app re-ingest, unchanged", again.chunks, again.seconds)
    naive = naive_llamaindex(base, corpus, workdir, models["fp32"])
    print(f"  {naive.label}: {naive.seconds:.1f} s", flush=True)
    rows = [*(timings[p] for p in PRECISIONS), first, second, naive]
    served: tuple[Timing, Timing] | None = None
    if args.server:
        served = server_mode(args, base, workdir, corpus, nodes, models, qa, quality, chosen, first)
        rows += [timing for timing in served if timing not in rows]

    print()
    print(f"{'':34}{'chunks':>8}{'seconds':>10}{'chunks/s':>10}")
    for row in rows:
        print(f"{row.label:34}{row.chunks:>8}{row.seconds:>10.1f}{row.rate:>10.1f}")
    print()
    for precision in quality:
        print(f"quality {precision:5} (exact search)  {quality[precision].row()}")
    int8_ratio = timings["int8"].rate / timings["bf16"].rate
    print(f"int8 / bf16 chunks/s: {int8_ratio:.2f}x (target >= 1.6)")
    print(f"precision used: {chosen} (fastest within {QUALITY_TOLERANCE} hit@{args.k} of fp32)")
    a = first.seconds / timings[chosen].seconds
    b = first.rate / naive.rate
    c = second.seconds / first.seconds
    print()
    print(f"(a) ingest / bare forward passes ({chosen}): {a:.2f}  (target <= 1.15)")
    print(f"(b) ingest chunks/s / naive fp32 LlamaIndex: {b:.2f}x (target >= 2)")
    print(f"(c) unchanged re-ingest / first ingest:     {c:.3f} (target <= 0.05)")
    d = served[0].rate / served[1].rate if served else None
    if served:
        print(f"(d) in-process / server-mode ingest chunks/s ({args.server_precision}, "
              f"{args.in_flight} in flight): {d:.2f} (target <= 1.2)")  # fmt: skip
    if args.out:
        figures = {
            "timings": {t.label: {"chunks": t.chunks, "seconds": t.seconds} for t in rows},
            "quality": {p: s.to_json() for p, s in quality.items()},
            "precision": chosen,
            "a": a, "b": b, "c": c, "d": d, "int8_over_bf16": int8_ratio,
        }  # fmt: skip
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
