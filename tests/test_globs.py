"""ingestion.include/exclude without a model or Milvus: the matcher's semantics (the one
eval/corpora.json is read with too), their validation in the settings and on the command
line, and which files of a folder they keep."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import PROFILE

from rag_app.cli import main
from rag_app.components.globs import glob_problem, matches, selected, unmatched
from rag_app.components.readers import discover, select_files
from rag_app.config import load_config
from rag_app.errors import RagAppError


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("**/*.md", "a.md", True),  # '**/' is zero folders too
        ("**/*.md", "x/y/a.md", True),
        ("*.md", "x/a.md", False),  # '*' stays inside one segment
        ("*.md", "a.md", True),
        ("x/*.md", "x/y/a.md", False),
        ("x/**", "x/y/a.md", True),
        ("x/**", "xy/a.md", False),
        ("genindex*.html", "genindex-A.html", True),
        ("genindex*.html", "sub/genindex.html", False),  # the whole path must match
        ("a?.md", "ab.md", True),
        ("a?.md", "a/.md", False),  # '?' is no '/'
        ("a.md", "a.md.bak", False),
        ("a+b(1).md", "a+b(1).md", True),  # other characters are themselves
        ("_sources/**", "_sources/library/functools.rst.txt", True),
    ],
)
def test_the_matcher(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_include_and_exclude_together():
    assert selected("a.md", [], [])  # no include globs: every file
    assert selected("a.md", ["**/*.md"], ["drafts/**"])
    assert not selected("drafts/a.md", ["**/*.md"], ["drafts/**"])
    assert not selected("a.txt", ["**/*.md"], [])
    assert not selected("a.md", [], ["*.md"])


def test_unmatched_names_the_globs_that_match_nothing():
    assert unmatched(["**/*.md", "**/*.rst", "x/**"], ["a.md", "x/b.js"]) == ["**/*.rst"]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("", "empty"), ("/docs/*.md", "absolute"), ("docs\\a.md", "backslash"),
     ("../x.md", "'..'"), ("./a.md", "'.'")],
)  # fmt: skip
def test_globs_that_can_never_match_are_refused_in_the_settings(pattern, problem):
    assert glob_problem(pattern) is not None
    with pytest.raises(RagAppError) as caught:
        load_config(PROFILE, ingestion__exclude=["ok/**", pattern])
    message = str(caught.value)
    assert "\n" not in message and "ingestion.exclude" in message and problem in message
    assert repr(pattern) in message


def test_the_settings_default_to_every_file_and_take_lists():
    cfg = load_config(PROFILE)
    assert (cfg.ingestion.include, cfg.ingestion.exclude) == ([], [])
    cfg = load_config(PROFILE, ingestion__include=["**/*.md"], ingestion__exclude=["a/**"])
    assert (cfg.ingestion.include, cfg.ingestion.exclude) == (["**/*.md"], ["a/**"])


def _folder(root: Path) -> Path:
    for name in ("a.md", "drafts/b.md", "c.txt", "_static/x.js", "_static/y.css"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\ntext of {name}\n")
    return root


def test_select_files_keeps_what_the_globs_keep_and_counts_the_rest(tmp_path):
    root = _folder(tmp_path / "docs")
    files = discover(root)
    chosen = select_files(root, files, ["**/*.md", "**/*.rst"], ["drafts/**", "_static/**"])
    assert [f.relative_to(root).as_posix() for f in chosen.files] == ["a.md"]
    assert chosen.excluded == 2  # drafts/b.md and c.txt; _static holds no supported file
    # An exclude that matches only files rag_app would not read anyway is no typo.
    assert (chosen.unmatched_include, chosen.unmatched_exclude) == (["**/*.rst"], [])
    assert select_files(root, files, [], []).files == files


def test_a_single_named_file_is_kept_whatever_the_globs_say(tmp_path):
    root = _folder(tmp_path / "docs")
    single = root / "drafts" / "b.md"
    chosen = select_files(single, discover(single), ["*.txt"], ["**"])
    assert chosen.files == [single] and chosen.excluded == 0


def test_an_include_that_leaves_nothing_is_one_line_naming_the_globs(tmp_path, caplog):
    from rag_app import ingest_path

    root = _folder(tmp_path / "docs")
    cfg = load_config(PROFILE, milvus__uri=str(tmp_path / "m.db"), ingestion__include=["*.rst"])
    with caplog.at_level(logging.WARNING), pytest.raises(RagAppError) as caught:
        ingest_path(cfg, root)
    message = str(caught.value)
    assert "\n" not in message and "no documents to ingest" in message
    assert "['*.rst']" in message and "ingestion.include" in message
    assert any("'*.rst' matches no file" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "m.db").exists()  # refused before Milvus was opened


def test_a_bad_glob_on_the_command_line_is_one_line_naming_the_flag(tmp_path, capsys):
    root = _folder(tmp_path / "docs")
    status = main(["ingest", str(root), "--config", str(PROFILE), "--exclude", "/abs/**"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("rag-app: error: --exclude '/abs/**' is absolute")
