"""The retrieval evaluation harness: document-level hit@1, hit@k, MRR and nDCG@k."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
from conftest import CORPUS, HNSW_QUESTION, PROFILE
from llama_index.core.schema import NodeWithScore, TextNode

from rag_app import RagAppError
from rag_app.cli import main as cli_main
from rag_app.pipelines.evaluate import QAItem, load_qa, ranked_documents, score


def test_scores_follow_the_rank_of_the_first_relevant_document():
    items = [
        QAItem("q1", ("a.md",)),  # found first
        QAItem("q2", ("b.md",)),  # found third
        QAItem("q3", ("c.md", "d.md")),  # one of two found second
        QAItem("q4", ("e.md",)),  # not found
    ]
    rankings = [["a.md", "x.md"], ["x.md", "y.md", "b.md"], ["x.md", "d.md"], ["x.md"]]
    scores = score(items, rankings, k=5)
    assert scores.questions == 4
    assert scores.hit_at_1 == pytest.approx(1 / 4)
    assert scores.hit_at_k == pytest.approx(3 / 4)
    assert scores.mrr == pytest.approx((1 + 1 / 3 + 1 / 2 + 0) / 4)
    ndcg_q3 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert scores.ndcg_at_k == pytest.approx((1 + 1 / math.log2(4) + ndcg_q3 + 0) / 4)
    assert score(items, rankings, k=2).hit_at_k == pytest.approx(2 / 4)


def test_chunks_count_once_per_document_best_first():
    nodes = [
        NodeWithScore(node=TextNode(text=t, metadata={"source": s}), score=1.0)
        for t, s in [("1", "a.md"), ("2", "a.md"), ("3", "b.md"), ("4", "c.md")]
    ]
    assert ranked_documents(nodes, k=2) == ["a.md", "b.md"]


def test_unanswerable_questions_are_left_out_of_retrieval_scores():
    items = [QAItem("q1", ("a.md",)), QAItem("no answer", ())]
    assert score(items, [["a.md"], ["a.md"]], k=5).questions == 1


def test_a_malformed_qa_line_is_a_one_line_error_naming_the_line(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "ok?", "sources": ["a.md"]}\n{"sources": ["b.md"]}\n')
    with pytest.raises(RagAppError, match=r"qa.jsonl:2: not a QA line \(KeyError"):
        load_qa(qa)
    with pytest.raises(RagAppError, match="QA file not found"):
        load_qa(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_cli_eval_prints_the_table_and_writes_json(tmp_path):
    docs = tmp_path / "docs"
    for page in ("reference/index.md", "reference/metric.md", "reference/consistency.md"):
        (docs / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / page, docs / page)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        json.dumps({"question": HNSW_QUESTION, "sources": ["reference/index.md"]})
        + "\n"
        + json.dumps({"question": "Who wins the next World Cup?", "sources": []})
        + "\n"
    )
    env = {"RAG_APP_MILVUS__URI": str(tmp_path / "eval.db"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    cli = [sys.executable, "-m", "rag_app.cli"]
    for args in (["ingest", str(docs)], ["eval", str(qa), "-k", "2", "--out", "scores.json"]):
        done = subprocess.run(
            [*cli, *args, "--config", str(PROFILE)],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert "hit@1 1.000  hit@2 1.000  MRR 1.000  nDCG@2 1.000  (1 questions)" in done.stdout
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["questions"] == 1 and written["mrr"] == 1.0
    ranking = written["per_question"][0]["ranking"]
    assert ranking[0] == "reference/index.md" and len(ranking) == len(set(ranking)) <= 2


def test_cli_eval_of_a_bad_file_is_one_line(tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("not json\n")
    assert cli_main(["eval", str(qa), "--config", str(PROFILE)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"rag-app: error: {qa}:1: not a QA line (JSONDecodeError: Expecting value: line 1 "
        'column 1 (char 0)); expected {"question": "...", "sources": ["path", ...]}'
    ]
