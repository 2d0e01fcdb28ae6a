"""ingestion.include/exclude on real components (Milvus Lite, MiniLM): files left out are
not part of the folder, so a re-ingest after adding an exclude deletes exactly their
documents and re-embeds nothing; the CLI's --include/--exclude append to the settings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import PROFILE, contents
from test_ingest_sync import write_docs

from rag_app import build_vector_store, ingest_path

pytestmark = pytest.mark.slow

PAGES = {
    "a.md": "# Alpha\nAlpha explains vector indexes and their parameters.\n",
    "guide/b.md": "# Bravo\nBravo covers partitions and shards in a collection.\n",
    "guide/drafts/c.md": "# Charlie\nCharlie is a draft about consistency levels.\n",
    "notes.txt": "Delta is a plain text note about compaction.\n",
}


def doc_ids(store) -> set[str]:
    return {doc for _, doc, _ in contents(store)}


def test_include_and_exclude_decide_what_is_ingested(small_cfg, embed_model, tmp_path, caplog):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    small_cfg.ingestion.include = ["**/*.md"]
    small_cfg.ingestion.exclude = ["**/drafts/**", "old/**"]
    store = build_vector_store(small_cfg, embed_model)
    with caplog.at_level(logging.WARNING):
        report = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert doc_ids(store) == {"a.md", "guide/b.md"}
    assert (report.added, report.excluded, report.deleted) == (2, 2, 0)
    assert "2 files excluded by ingestion.include/exclude" in report.summary()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ingestion.exclude glob 'old/**' matches no file" in w for w in warnings)
    assert not any("'**/drafts/**'" in w for w in warnings)


def test_adding_an_exclude_deletes_those_documents_and_keeps_the_rest_as_they_were(
    small_cfg, embed_model, tmp_path, embedding_calls
):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    store = build_vector_store(small_cfg, embed_model)
    first = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert first.added == 4
    before = contents(store)

    embedding_calls.calls = 0
    small_cfg.ingestion.exclude = ["guide/**"]
    again = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (again.added, again.updated, again.unchanged, again.deleted, again.excluded) == (
        0, 0, 2, 2, 2,
    )  # fmt: skip
    assert embedding_calls.calls == 0
    assert contents(store) == {row for row in before if not row[1].startswith("guide/")}

    small_cfg.ingestion.exclude = []
    back = ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (back.added, back.unchanged, back.deleted) == (2, 2, 0)
    assert contents(store) == before  # stable ids: the same rows as the first time


def test_a_named_file_is_ingested_even_if_excluded_and_deletes_nothing(
    small_cfg, embed_model, tmp_path
):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    small_cfg.ingestion.exclude = ["guide/**"]
    store = build_vector_store(small_cfg, embed_model)
    ingest_path(small_cfg, folder, embed_model=embed_model, vector_store=store)
    report = ingest_path(
        small_cfg, folder / "guide" / "b.md", embed_model=embed_model, vector_store=store
    )
    assert (report.added, report.deleted, report.excluded) == (1, 0, 0)
    assert doc_ids(store) == {"a.md", "notes.txt", "b.md"}


def test_the_cli_flags_append_to_the_settings(tmp_path):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    db = tmp_path / "cli.db"
    env = {
        **os.environ,
        "RAG_APP_MILVUS__URI": str(db),
        "RAG_APP_INGESTION__EXCLUDE": '["notes.txt"]',  # the settings' glob
    }
    done = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "ingest", str(folder), "--config", str(PROFILE),
         "--no-progress", "--exclude", "**/drafts/**", "--include", "**/*.md",
         "--include", "**/*.txt"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # notes.txt by the settings' exclude, drafts/c.md by the flag: both apply.
    assert "ingested 2 documents: 2 added" in done.stdout
    assert "2 files excluded by ingestion.include/exclude" in done.stdout

    from pymilvus import MilvusClient

    client = MilvusClient(str(db))
    try:
        client.load_collection("rag_docs")  # a new client finds it released
        rows = client.query("rag_docs", filter='id != ""', output_fields=["doc_id"])
    finally:
        client.close()
    assert {r["doc_id"] for r in rows} == {"a.md", "guide/b.md"}
