"""Finishing an answer, one way for every caller; questions checked before anything loads."""

from __future__ import annotations

import json

import pytest
from llama_index.core.schema import NodeWithScore, TextNode

from rag_app import RagAppError, load_config
from rag_app.cli import main
from rag_app.pipelines.answer import answer_dict, check_question, finish_answer
from rag_app.prompts import ABSTAIN_ANSWER


def _sources(*names: str) -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=f"text of {n}", metadata={"source": n}), score=0.5)
        for n in names
    ]


def test_a_finished_answer_keeps_known_citations_and_drops_unknown_ones():
    answer = finish_answer("q", " HNSW uses M [1] and ef [3]. ", _sources("a.md", "b.md"))
    assert answer.answer == "HNSW uses M [1] and ef."
    assert answer.citations == [1]
    assert not answer.abstained


def test_an_answer_abstains_without_sources_or_with_the_fixed_reply():
    assert finish_answer("q", "Anything.", []).abstained
    assert finish_answer("q", ABSTAIN_ANSWER, _sources("a.md")).abstained
    assert not finish_answer("q", "The index is HNSW.", _sources("a.md")).abstained


def test_an_answer_as_json_numbers_its_sources_as_they_are_cited():
    answer = finish_answer("q", "It is [2].", _sources("a.md", "b.md"), {"total": 1.23456})
    data = json.loads(json.dumps(answer_dict(answer)))
    assert [(s["number"], s["source"]) for s in data["sources"]] == [(1, "a.md"), (2, "b.md")]
    assert data["citations"] == [2]
    assert data["timings"] == {"total": 1.2346}
    assert "error" not in data


@pytest.mark.parametrize(
    ("question", "message"),
    [("", "the question is empty"), ("  \n\t ", "the question is empty"),
     ("x" * 4001, "4001 characters long, over retrieval.max_question_chars = 4000")],
)  # fmt: skip
def test_empty_and_overlong_questions_are_one_line_errors(question, message):
    with pytest.raises(RagAppError, match=message):
        check_question(question, load_config(None))
    assert check_question("  What is HNSW?  ", load_config(None)) == "What is HNSW?"


@pytest.fixture
def no_model_may_load(monkeypatch):
    """Fails the test if an LLM or embedding model is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rag_app.components.llm.build_llm", refuse)
    monkeypatch.setattr("rag_app.components.embedding.build_embed_model", refuse)


@pytest.mark.parametrize("question", ["", "   ", "y" * 5000])
def test_cli_refuses_a_bad_question_before_loading_any_model(question, no_model_may_load, capsys):
    status = main(["query", question, "--config", "configs/cpu-small.toml"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("rag-app: error: the question is") and err.count("\n") == 1


def test_cli_top_k_is_bounded_like_the_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["query", "q", "--top-k", "101"])
    assert exit_.value.code == 2
    assert "--top-k: must be between 1 and 100, got 101" in capsys.readouterr().err
