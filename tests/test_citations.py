"""Citations point to retrieved excerpts or are removed."""

from __future__ import annotations

from rag_app.pipelines.citations import check_citations, number_excerpts


def test_excerpts_are_numbered_best_first():
    assert number_excerpts(["best", "next"]) == ["[1] best", "[2] next"]


def test_citations_of_retrieved_excerpts_are_kept_and_listed():
    answer = "HNSW takes M and efConstruction [2]. Search uses ef [1][2]."
    assert check_citations(answer, 3) == (answer, [1, 2])


def test_citations_to_no_excerpt_are_removed():
    answer, cited = check_citations("M sets the degree [4]. Use ef [1], not nprobe [0].", 3)
    assert answer == "M sets the degree. Use ef [1], not nprobe."
    assert cited == [1]


def test_an_answer_without_citations_is_left_alone():
    assert check_citations("No citation here [sic].", 3) == ("No citation here [sic].", [])
