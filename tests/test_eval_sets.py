"""The retrieval evaluation sets: eval/corpora.json describes each corpus once, and
eval/<corpus>/{dev,test}.jsonl hold its questions. Standard library, pytest and rag_app's
glob matcher only (no models, no Milvus), so it also runs without tests/conftest.py:
`PYTHONPATH=. pytest --noconftest tests/test_eval_sets.py`."""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

from rag_app.components.globs import selected

EVAL = Path(__file__).resolve().parent.parent / "eval"
CORPORA: dict[str, dict] = json.loads((EVAL / "corpora.json").read_text(encoding="utf-8"))
SPLITS = ("dev", "test")
FIELDS = {"question", "sources", "kind", "style"}
KINDS = {"fact", "howto", "concept", "multi", "error", "vague", "unanswerable"}
STYLES = {"paraphrase", "terms"}
MIN_PER_KIND = {"dev": 4, "test": 5}
MIN_PARAPHRASE_SHARE = 0.5
MIN_QUESTIONS_OVERALL = 150

SETS = [(c, s) for c in CORPORA for s in SPLITS if (EVAL / c / f"{s}.jsonl").is_file()]
CORPORA_WITH_SETS = sorted({c for c, _ in SETS})
SET_IDS = [f"{c}/{s}" for c, s in SETS]


def corpus_root(corpus: str) -> Path:
    """The corpus folder; a missing one fails the calling test with the way to get it."""
    spec = CORPORA[corpus]
    root = (EVAL / spec["path"]).resolve()
    if not root.is_dir():
        how = spec.get("install", "see its 'about' in eval/corpora.json")
        pytest.fail(f"corpus {corpus!r} not found at {root}; install it: {how}", pytrace=False)
    return root


def ingested(corpus: str, rel: str) -> bool:
    """Whether ingesting the corpus with its include/exclude globs reads ``rel``: the same
    matcher as ``rag-app ingest`` (ingestion.include/exclude)."""
    spec = CORPORA[corpus]
    return selected(rel, spec["include"], spec.get("exclude", []))


@cache
def rows(corpus: str, split: str) -> tuple[dict, ...]:
    """The parsed lines of one set; any line that is not a JSON object fails the test."""
    path = EVAL / corpus / f"{split}.jsonl"
    parsed = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            pytest.fail(f"{path.name}:{n} is not JSON ({e})", pytrace=False)
        if not isinstance(row, dict):
            pytest.fail(f"{path.name}:{n} is not a JSON object", pytrace=False)
        parsed.append(row)
    return tuple(parsed)


def norm(question: str) -> str:
    return " ".join(question.casefold().split())


def where(split: str, n: int, row: dict) -> str:
    return f"{split}.jsonl:{n} {row.get('question', '')[:70]!r}"


def test_the_corpora_file_gives_each_corpus_a_path_include_patterns_and_a_description():
    assert CORPORA, "eval/corpora.json lists no corpus"
    for name, spec in CORPORA.items():
        assert isinstance(spec.get("path"), str) and spec["path"], name
        assert isinstance(spec.get("include"), list) and spec["include"], name
        patterns = spec["include"] + spec.get("exclude", [])
        assert all(isinstance(p, str) and p for p in patterns), name
        assert isinstance(spec.get("about"), str) and spec["about"].strip(), name
        assert set(spec) <= {"path", "include", "exclude", "install", "about"}, name


def test_the_exclude_patterns_keep_the_python_docs_navigation_pages_out():
    assert ingested("python-docs", "library/functools.html")
    assert ingested("python-docs", "index.html")
    for page in (
        "genindex.html",
        "genindex-A.html",
        "search.html",
        "py-modindex.html",
        "contents.html",
        "_sources/library/functools.rst.txt",
        "_static/x.html",
    ):
        assert not ingested("python-docs", page), page


@pytest.mark.parametrize("corpus", list(CORPORA))
def test_every_corpus_folder_is_present(corpus):
    assert any(corpus_root(corpus).iterdir()), f"corpus folder of {corpus!r} is empty"


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_every_line_has_exactly_the_four_fields_with_allowed_values(corpus, split):
    for n, row in enumerate(rows(corpus, split), 1):
        assert set(row) == FIELDS, f"{where(split, n, row)}: fields {sorted(row)}"
        assert isinstance(row["question"], str) and row["question"].strip(), where(split, n, row)
        assert row["kind"] in KINDS, f"{where(split, n, row)}: kind {row['kind']!r}"
        assert row["style"] in STYLES, f"{where(split, n, row)}: style {row['style']!r}"
        assert isinstance(row["sources"], list), where(split, n, row)
        assert all(isinstance(s, str) for s in row["sources"]), where(split, n, row)


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_every_source_is_a_page_of_the_corpus_that_ingestion_keeps(corpus, split):
    root = corpus_root(corpus)
    for n, row in enumerate(rows(corpus, split), 1):
        sources = row["sources"]
        assert len(set(sources)) == len(sources), f"{where(split, n, row)}: a source repeats"
        for rel in sources:
            parts = PurePosixPath(rel).parts
            assert rel and not rel.startswith("/") and ".." not in parts and "\\" not in rel, (
                f"{where(split, n, row)}: {rel!r} is not a relative corpus path"
            )
            assert (root / rel).is_file(), f"{where(split, n, row)}: {rel} not in {root}"
            assert ingested(corpus, rel), f"{where(split, n, row)}: {rel} is excluded"


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_only_unanswerable_questions_have_no_sources(corpus, split):
    for n, row in enumerate(rows(corpus, split), 1):
        assert (row["kind"] == "unanswerable") == (not row["sources"]), (
            f"{where(split, n, row)}: kind {row['kind']} with {len(row['sources'])} sources"
        )


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_multi_page_questions_cite_at_least_two_pages(corpus, split):
    for n, row in enumerate(rows(corpus, split), 1):
        if row["kind"] == "multi":
            assert len(row["sources"]) >= 2, where(split, n, row)


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_no_question_repeats_within_a_split(corpus, split):
    seen = Counter(norm(row["question"]) for row in rows(corpus, split))
    assert not [q for q, k in seen.items() if k > 1]


@pytest.mark.parametrize("corpus", CORPORA_WITH_SETS)
def test_dev_and_test_share_no_question(corpus):
    present = [s for s in SPLITS if (corpus, s) in SETS]
    dev, test = (
        {norm(r["question"]) for r in rows(corpus, s)} if s in present else set() for s in SPLITS
    )
    assert not dev & test


@pytest.mark.parametrize(("corpus", "split"), SETS, ids=SET_IDS)
def test_every_kind_of_question_appears_often_enough_in_each_split(corpus, split):
    kinds = Counter(row.get("kind") for row in rows(corpus, split))
    short = {k: kinds[k] for k in sorted(KINDS) if kinds[k] < MIN_PER_KIND[split]}
    assert not short, f"{corpus}/{split} needs at least {MIN_PER_KIND[split]} of each kind: {short}"


@pytest.mark.parametrize("corpus", CORPORA_WITH_SETS)
def test_at_least_half_of_a_corpus_questions_are_paraphrases(corpus):
    styles = Counter(row.get("style") for c, s in SETS if c == corpus for row in rows(c, s))
    total = sum(styles.values())
    assert styles["paraphrase"] >= MIN_PARAPHRASE_SHARE * total, dict(styles)


def test_all_corpora_together_hold_at_least_150_questions():
    total = sum(len(rows(c, s)) for c, s in SETS)
    by_set = {f"{c}/{s}": len(rows(c, s)) for c, s in SETS}
    assert total >= MIN_QUESTIONS_OVERALL, f"{total} questions: {by_set}"
