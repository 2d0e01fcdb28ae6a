"""Retrieval quality and speed of rag_app's configurations beside a naive LlamaIndex
pipeline, per corpus, split and question kind, from one run.

    .venv/bin/python scripts/bench_retrieval.py [--corpus milvus-docs|python-docs|all]
        [--split dev|test|both] [-k 5] [--set SECTION.KEY=VALUE ...] [--no-context]
        [--variants dense,hybrid-rrf,...] [--out results.json]

Each corpus of eval/corpora.json (the Milvus docs, the Python docs from Debian's
python3-doc) is ingested into fresh Milvus Lite files with configs/cpu-small.toml (the
offline MiniLM), once per chunking (with and without ``chunking.context_template``), then
every question of ``eval/<corpus>/<split>.jsonl`` is retrieved by each variant. Scores are
per document (hit@1, hit@k, MRR: ``rag-app eval``'s), from the best ``4 * k`` chunks;
"p50" is the median wall time of one retrieve call (query embedding included).

The baseline is what a LlamaIndex notebook does with the same model and Milvus:
``SimpleDirectoryReader`` (file metadata embedded with the text; HTML as BeautifulSoup's
visible text),
``SentenceSplitter(chunk_size=128, chunk_overlap=20)`` (tokens), ``VectorStoreIndex`` over
``MilvusVectorStore``, dense retrieval. Tune on ``dev``; report ``test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from llama_index.core.schema import NodeWithScore

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "eval"
PROFILE = REPO / "configs" / "cpu-small.toml"
KINDS = ("fact", "howto", "concept", "multi", "error", "vague")
# rag_app retrieval variants: settings of [retrieval] each one overrides.
VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid-w0.5": {"mode": "hybrid", "fusion": "weighted", "dense_weight": 0.5},
    "hybrid-w0.7": {"mode": "hybrid", "fusion": "weighted", "dense_weight": 0.7},
    "hybrid-w0.85": {"mode": "hybrid", "fusion": "weighted", "dense_weight": 0.85},
}


@dataclass
class Run:
    """One pipeline's rankings of every question of one split, and its retrieve times."""

    name: str
    rankings: list[list[str]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def corpus_spec(name: str) -> tuple[Path, list[str], list[str]]:
    spec = json.loads((EVAL / "corpora.json").read_text(encoding="utf-8"))[name]
    root = (EVAL / spec["path"]).resolve()
    if not root.is_dir():
        raise SystemExit(f"corpus {name} not found at {root} ({spec.get('install', '')})")
    return root, list(spec.get("include", [])), list(spec.get("exclude", []))


def run_questions(
    name: str, questions: Sequence[str], retrieve: Callable[[str], list[NodeWithScore]], k: int,
    source_of: Callable[[NodeWithScore], str],
) -> Run:  # fmt: skip
    run = Run(name)
    for question in questions:
        started = time.perf_counter()
        nodes = retrieve(question)
        run.seconds.append(time.perf_counter() - started)
        ranked: list[str] = []
        for node in nodes:
            source = source_of(node)
            if source and source not in ranked:
                ranked.append(source)
        run.rankings.append(ranked[:k])
    return run


def torch_bf16() -> Any:
    from rag_app.components.embedding import import_torch  # the OpenMP policy rag_app uses

    return import_torch().bfloat16


class _HtmlText:
    """HTML as its visible text (BeautifulSoup's ``get_text``), as a notebook would add for
    .html files: SimpleDirectoryReader has no HTML reader and would embed the markup."""

    def load_data(self, file: Path, extra_info: dict | None = None, **_: Any) -> list[Any]:
        from bs4 import BeautifulSoup
        from llama_index.core import Document

        soup = BeautifulSoup(
            Path(file).read_text(encoding="utf-8", errors="replace"), "html.parser"
        )
        for tag in soup(["script", "style"]):
            tag.decompose()
        return [Document(text=soup.get_text("\n"), metadata=extra_info or {})]


def naive_pipeline(root: Path, include: list[str], exclude: list[str], model: str, uri: str):
    """The LlamaIndex notebook: defaults everywhere but the model and the chunk size."""
    from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.vector_stores.milvus import MilvusVectorStore

    extensions = sorted({"." + glob.rsplit(".", 1)[-1] for glob in include}) or None
    reader = SimpleDirectoryReader(
        str(root), recursive=True, required_exts=extensions, exclude=exclude or None,
        file_extractor={".html": _HtmlText()},
    )  # fmt: skip
    documents = reader.load_data()
    # The same bf16 weights as rag_app's rows, so the rows differ by pipeline, not precision.
    embed_model = HuggingFaceEmbedding(model_name=model, model_kwargs={"dtype": torch_bf16()})
    store = MilvusVectorStore(uri=uri, dim=384, overwrite=True)
    started = time.perf_counter()
    index = VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=store),
        embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=128, chunk_overlap=20)],
    )
    print(
        f"  naive: {len(documents)} documents ingested in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    def source_of(node: NodeWithScore) -> str:
        path = node.node.metadata.get("file_path", "")
        return os.path.relpath(path, root) if path else ""

    return index, source_of


def rag_app_pipeline(root: Path, include: list[str], exclude: list[str], uri: str,
                     overrides: dict[str, Any]):  # fmt: skip
    from rag_app import build_embed_model, build_vector_store, ingest_path, load_config

    settings: dict[str, Any] = {"milvus__uri": uri, **overrides}
    if hasattr(load_config(PROFILE).ingestion, "include"):
        settings.setdefault("ingestion__include", include)
        settings.setdefault("ingestion__exclude", exclude)
    cfg = load_config(PROFILE, **settings)
    embed_model = build_embed_model(cfg)
    store = build_vector_store(cfg, embed_model)
    report = ingest_path(cfg, root, embed_model=embed_model, vector_store=store, progress=False)
    print(f"  rag_app {overrides or '(profile settings)'}: {report.summary()}", flush=True)
    return cfg, embed_model


def rag_app_runs(cfg, embed_model, label: str, questions: Sequence[str], k: int,
                 variants: Sequence[str]) -> list[Run]:  # fmt: skip
    from rag_app import build_index, build_vector_store
    from rag_app.components.retrieval import build_retriever

    runs = []
    for name in variants:
        variant = cfg.model_copy(deep=True)
        for key, value in VARIANTS[name].items():
            setattr(variant.retrieval, key, value)
        store = build_vector_store(variant, embed_model)  # fusion settings live on the store
        index = build_index(variant, embed_model=embed_model, vector_store=store)
        retriever = build_retriever(variant, index, top_k=4 * k)
        source_of: Callable[[NodeWithScore], str] = lambda n: str(n.node.metadata.get("source"))  # noqa: E731
        runs.append(run_questions(f"{label}{name}", questions, retriever.retrieve, k, source_of))
    return runs


def latency_budget(cfg, embed_model, questions: Sequence[str], k: int) -> str:
    """Where one retrieve call's time goes, per stage (p50 / p95 ms), per mode."""
    from llama_index.core.schema import QueryBundle

    from rag_app import build_index, build_vector_store
    from rag_app.components.retrieval import build_retriever

    lines = ["", f"latency budget, {len(questions)} questions (p50 / p95 ms)", "",
             "| mode | query embedding | Milvus call | LlamaIndex search wrapper | "
             "postprocessors | retrieve (whole) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in ("dense", "sparse", "hybrid-rrf", "hybrid-w0.7"):
        variant = cfg.model_copy(deep=True)
        for key, value in VARIANTS[name].items():
            setattr(variant.retrieval, key, value)
        store = build_vector_store(variant, embed_model)
        index = build_index(variant, embed_model=embed_model, vector_store=store)
        retriever = build_retriever(variant, index, top_k=4 * k)
        milvus: list[float] = []
        client = store.client
        for method in ("search", "hybrid_search"):
            original = getattr(client, method)

            def timed(
                *args: Any, _original: Any = original, _times: list = milvus, **kwargs: Any
            ) -> Any:
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    _times.append(time.perf_counter() - started)

            setattr(client, method, timed)
        stages: dict[str, list[float]] = {"embed": [], "search": [], "post": [], "whole": []}
        for question in questions:
            started = time.perf_counter()
            bundle = QueryBundle(question, embedding=embed_model.get_query_embedding(question))
            embedded = time.perf_counter()
            nodes = retriever.retriever.retrieve(bundle)
            searched = time.perf_counter()
            for stage in retriever.postprocessors:
                nodes = stage.postprocess_nodes(nodes, bundle)
            done = time.perf_counter()
            stages["embed"].append(embedded - started)
            stages["search"].append(searched - embedded)
            stages["post"].append(done - searched)
        calls = len(milvus)
        for question in questions:
            started = time.perf_counter()
            retriever.retrieve(question)
            stages["whole"].append(time.perf_counter() - started)
        wrapper = [s - m for s, m in zip(stages["search"], milvus[:calls], strict=True)]

        def cell(values: Sequence[float]) -> str:
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
            return f"{statistics.median(ordered) * 1000:.1f} / {p95 * 1000:.1f}"

        lines.append(
            f"| {name} | {cell(stages['embed'])} | {cell(milvus[:calls])} | {cell(wrapper)} | "
            f"{cell(stages['post'])} | {cell(stages['whole'])} |"
        )
    return "\n".join(lines)


def table(title: str, items: Sequence[Any], runs: Sequence[Run], k: int) -> str:
    """Markdown: overall scores and p50, then hit@k / MRR per question kind."""
    from rag_app.pipelines.evaluate import score

    kinds = [kind for kind in KINDS if any(item.kind == kind for item in items)]
    counts = {
        kind: sum(item.kind == kind and bool(item.sources) for item in items) for kind in kinds
    }
    head = f"| pipeline | hit@1 | hit@{k} | MRR | p50 ms | " + " | ".join(
        f"{kind} ({counts[kind]})" for kind in kinds
    )
    lines = [f"\n{title}", "", head + " |", "|---" * (5 + len(kinds)) + "|"]
    for run in runs:
        overall = score(items, run.rankings, k)
        cells = [
            f"{overall.hit_at_1:.3f}", f"{overall.hit_at_k:.3f}", f"{overall.mrr:.3f}",
            f"{statistics.median(run.seconds) * 1000:.0f}",
        ]  # fmt: skip
        for kind in kinds:
            chosen = [i for i, item in enumerate(items) if item.kind == kind]
            part = score([items[i] for i in chosen], [run.rankings[i] for i in chosen], k)
            cells.append(f"{part.hit_at_k:.2f} / {part.mrr:.2f}")
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    lines.append(f"(cells per kind: hit@{k} / MRR; {score(items, runs[0].rankings, k).questions}"
                 " answerable questions)")  # fmt: skip
    return "\n".join(lines)


def quiet_logs() -> None:
    """Warnings only, without the chunk-length ones and Lite's gRPC noise."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("rag_app").setLevel(logging.ERROR)  # the chunk-length warnings
    logging.getLogger("llama_index.core.readers.file.base").setLevel(logging.ERROR)
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)  # Lite's AllocTimestamp


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: expected SECTION.KEY=VALUE")
        try:
            overrides[key.replace(".", "__")] = json.loads(value)
        except ValueError:
            overrides[key.replace(".", "__")] = value
    return overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="all", help="milvus-docs, python-docs or all")
    parser.add_argument("--split", default="both", choices=["dev", "test", "both"])
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a rag_app setting for every rag_app row (repeatable)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS), help="rag_app rows to run")
    parser.add_argument("--no-context", action="store_true",
                        help="skip the rows without chunking.context_template")  # fmt: skip
    parser.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    parser.add_argument("--latency", action="store_true",
                        help="print where a retrieve call's time goes, per stage")  # fmt: skip
    parser.add_argument("--out", type=Path, help="write the rankings as JSON here")
    args = parser.parse_args()
    quiet_logs()

    from rag_app import load_config
    from rag_app.pipelines.evaluate import load_qa

    corpora = ["milvus-docs", "python-docs"] if args.corpus == "all" else [args.corpus]
    splits = ["dev", "test"] if args.split == "both" else [args.split]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    overrides = parse_sets(args.set)
    profile = load_config(PROFILE)
    template = getattr(profile.chunking, "context_template", None)
    chunkings: dict[str, dict[str, Any]] = {"": dict(overrides)}
    if template is not None:
        chunkings = {"ctx ": dict(overrides)}
        if not args.no_context:
            chunkings["bare "] = {**overrides, "chunking__context_template": ""}
    workdir = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    results: dict[str, Any] = {}
    print(f"profile {PROFILE.name}, settings {overrides or 'as in the profile'}, k={args.k}")
    for corpus in corpora:
        root, include, exclude = corpus_spec(corpus)
        items = {split: load_qa(EVAL / corpus / f"{split}.jsonl") for split in splits}
        runs: dict[str, list[Run]] = {split: [] for split in splits}
        print(f"\n{corpus}: {root}", flush=True)
        if not args.no_naive:
            index, source_of = naive_pipeline(
                root, include, exclude, profile.embedding.model, str(workdir / f"{corpus}-n.db")
            )
            retriever = index.as_retriever(similarity_top_k=4 * args.k)
            for split in splits:
                answerable = [item.question for item in items[split] if item.sources]
                run = run_questions("naive", answerable, retriever.retrieve, args.k, source_of)
                runs[split].append(run)
        for n, (label, settings) in enumerate(chunkings.items()):
            uri = str(workdir / f"{corpus}-{n}.db")
            cfg, embed_model = rag_app_pipeline(root, include, exclude, uri, settings)
            for split in splits:
                answerable = [item.question for item in items[split] if item.sources]
                runs[split] += rag_app_runs(cfg, embed_model, label, answerable, args.k, variants)
        if args.latency:
            questions = [item.question for split in splits for item in items[split]]
            print(latency_budget(cfg, embed_model, questions, args.k), flush=True)
        for split in splits:
            answerable = [item for item in items[split] if item.sources]
            print(table(f"{corpus} / {split}", answerable, runs[split], args.k), flush=True)
            results[f"{corpus}/{split}"] = {run.name: run.rankings for run in runs[split]}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
