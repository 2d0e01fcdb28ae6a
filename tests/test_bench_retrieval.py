"""scripts/bench_retrieval.py builds the naive LlamaIndex baseline beside rag_app's rows and
prints them in one table; scripts/sweep_fusion.py fuses as Milvus does (slow tier: MiniLM,
Milvus Lite, a slice of the Milvus docs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import MINILM, REPO, SLICE

pytestmark = pytest.mark.slow


def _script(name: str = "bench_retrieval"):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    if name != "bench_retrieval":
        _script()  # what the other scripts import by that name
    spec.loader.exec_module(module)
    return module


def _slice_questions():
    """The dev questions whose pages are all in the slice."""
    from rag_app.pipelines.evaluate import load_qa

    items = load_qa(REPO / "eval" / "milvus-docs" / "dev.jsonl")
    chosen = [i for i in items if i.sources and set(i.sources) <= set(SLICE)]
    assert len(chosen) >= 3
    return chosen


def test_the_naive_baseline_and_rag_app_rows_share_one_table(corpus_slice: Path, tmp_path):
    bench = _script()
    items = _slice_questions()
    questions = [item.question for item in items]
    index, source_of = bench.naive_pipeline(
        corpus_slice, ["**/*.md"], [], str(MINILM), str(tmp_path / "naive.db")
    )
    retriever = index.as_retriever(similarity_top_k=20)
    naive = bench.run_questions("naive", questions, retriever.retrieve, 5, source_of)
    # The naive pipeline's hits map to the corpus's relative paths, as the QA sources do.
    assert all(ranking for ranking in naive.rankings)
    assert {page for ranking in naive.rankings for page in ranking} <= set(SLICE)

    cfg, embed_model = bench.rag_app_pipeline(
        corpus_slice, ["**/*.md"], [], str(tmp_path / "rag.db"), {}
    )
    runs = bench.rag_app_runs(cfg, embed_model, "ctx ", questions, 5, ["dense", "hybrid-w0.7"])
    printed = bench.table("milvus-docs slice / dev", items, [naive, *runs], 5)
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ")]
    assert rows == ["pipeline", "naive", "ctx dense", "ctx hybrid-w0.7"]
    for run in runs:
        assert {page for ranking in run.rankings for page in ranking} <= set(SLICE)
    # The right page is found by every pipeline for most of these questions (10 pages in all).
    hit = {
        run.name: sum(
            bool(set(item.sources) & set(ranking))
            for item, ranking in zip(items, run.rankings, strict=True)
        )
        for run in [naive, *runs]
    }
    assert all(count >= len(items) - 1 for count in hit.values()), hit

    budget = bench.latency_budget(cfg, embed_model, questions, 5)
    stages = [line for line in budget.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [line.split("|")[1].strip() for line in stages[1:]] == [
        "dense", "sparse", "hybrid-rrf", "hybrid-w0.7"
    ]  # fmt: skip


def test_the_fusion_sweep_ranks_as_milvus_hybrid_search_does(corpus_slice: Path, tmp_path):
    """The sweep's weighted fusion of one dense and one BM25 search gives Milvus's own hybrid
    ranking, at the default weight and another, so its figures are what Milvus would give."""
    bench, sweep = _script(), _script("sweep_fusion")
    questions = [item.question for item in _slice_questions()]
    cfg, embed_model = bench.rag_app_pipeline(
        corpus_slice, ["**/*.md"], [], str(tmp_path / "rag.db"), {}
    )
    for weight in (cfg.retrieval.dense_weight, 0.4):
        cfg.retrieval.mode, cfg.retrieval.fusion, cfg.retrieval.dense_weight = (
            "hybrid", "weighted", weight
        )  # fmt: skip
        hits = sweep.candidates_of(cfg, embed_model, questions, 20)
        fuse = sweep.milvus_weighted(weight, 20)
        for question in hits:
            assert len(question["milvus"]) == 20
            assert [h[0] for h in fuse(question)[:20]] == [h[0] for h in question["milvus"]]
            assert [h[2] for h in fuse(question)[:20]] == pytest.approx(
                [h[2] for h in question["milvus"]], abs=1e-6
            )
