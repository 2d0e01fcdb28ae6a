"""Re-ingestion is a sync: unchanged documents cost no embedding, the collection ends up
holding exactly the folder's chunks, and a killed run is completed by the next one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROFILE, contents, fresh_contents
from pymilvus import MilvusClient

from rag_app import build_vector_store, ingest_path

pytestmark = pytest.mark.slow


def write_docs(folder: Path, pages: dict[str, str]) -> None:
    for name, text in pages.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


PAGES = {
    "a.md": "---\ntitle: Alpha\n---\n" + "Alpha explains vector indexes. " * 60,
    "b.md": "# Bravo\n" + "Bravo covers partitions and shards. " * 30,
    "c/d.txt": "Delta is about consistency levels in Milvus. " * 20,
}


def test_unchanged_folder_is_not_embedded_again(store_cfg, embed_model, tmp_path, embedding_calls):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    store = build_vector_store(store_cfg, embed_model)
    first = ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    assert (first.added, first.updated, first.unchanged, first.deleted) == (3, 0, 0, 0)
    assert embedding_calls.calls > 0
    before = contents(store)

    embedding_calls.calls = 0
    (folder / "b.md").touch()  # a new mtime alone is not a change
    again = ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    assert embedding_calls.calls == 0
    assert (again.added, again.updated, again.unchanged, again.deleted, again.chunks) == (
        0,
        0,
        3,
        0,
        0,
    )
    assert contents(store) == before


def test_edits_additions_and_deletions_leave_exactly_the_folders_chunks(
    store_cfg, embed_model, tmp_path
):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    store = build_vector_store(store_cfg, embed_model)
    ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)

    (folder / "a.md").write_text("---\ntitle: Alpha\n---\nAlpha is short now.")  # shrinks
    (folder / "b.md").write_text("# Bravo\n" + "Bravo grew a lot longer. " * 80)  # grows
    (folder / "c" / "d.txt").unlink()
    write_docs(folder, {"e.html": "<html><body><p>Echo page on replicas.</p></body></html>"})
    report = ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)

    assert (report.added, report.updated, report.unchanged, report.deleted) == (1, 2, 0, 1)
    assert contents(store) == fresh_contents(store_cfg, embed_model, folder, tmp_path)
    assert "1 added, 2 updated, 0 unchanged, 1 deleted" in report.summary()


def test_no_delete_keeps_documents_gone_from_the_folder(store_cfg, embed_model, tmp_path):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    store = build_vector_store(store_cfg, embed_model)
    ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    (folder / "b.md").unlink()
    report = ingest_path(
        store_cfg, folder, embed_model=embed_model, vector_store=store, delete_missing=False
    )
    assert report.deleted == 0
    assert {"a.md", "b.md", "c/d.txt"} == {doc for _, doc, _ in contents(store)}

    ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    assert {"a.md", "c/d.txt"} == {doc for _, doc, _ in contents(store)}


def test_a_file_that_turns_unreadable_keeps_its_stored_chunks(store_cfg, embed_model, tmp_path):
    folder = tmp_path / "docs"
    write_docs(folder, PAGES)
    store = build_vector_store(store_cfg, embed_model)
    ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    before = {row for row in contents(store) if row[1] == "b.md"}
    (folder / "b.md").write_bytes(b"\x00\x00 corrupted \x00")
    report = ingest_path(store_cfg, folder, embed_model=embed_model, vector_store=store)
    assert [Path(p).name for p, _ in report.skipped] == ["b.md"]
    assert report.deleted == 0
    assert {row for row in contents(store) if row[1] == "b.md"} == before


def _cli_env(db: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RAG_APP_CONFIG": str(PROFILE),
        "RAG_APP_MILVUS__URI": str(db),
        "RAG_APP_EMBEDDING__BATCH_SIZE": "4",  # 16-chunk batches: many writes to land between
    }


def _start_ingest(folder: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    # A shell starts background jobs (a backgrounded test run, say) with SIGINT ignored,
    # and children inherit that: give the CLI the disposition a terminal would.
    return subprocess.Popen(
        [sys.executable, "-m", "rag_app.cli", "ingest", str(folder), "--log-every", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for_first_write(process: subprocess.Popen[str]) -> None:
    """Returns once some, not all, documents are written (from the progress log lines)."""
    assert process.stderr is not None
    for line in process.stderr:
        written = re.search(r"(\d+)/(\d+) documents written", line)
        if written and 0 < int(written[1]) < int(written[2]):
            return
    raise AssertionError(f"ingest never stood part-way: rc={process.wait()}")


def test_sigkill_mid_run_then_rerun_gives_exactly_the_folders_chunks(
    session_cfg, ingested, corpus_slice, tmp_path
):
    folder = tmp_path / "slice"
    shutil.copytree(corpus_slice, folder)
    env = _cli_env(tmp_path / "killed.db")
    process = _start_ingest(folder, env)
    _wait_for_first_write(process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    rerun = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "ingest", str(folder), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "; 0 chunks written" not in rerun.stdout  # the kill left work for the re-run
    client = MilvusClient(uri=str(tmp_path / "killed.db"))
    client.load_collection(session_cfg.milvus.collection)
    assert contents(client, session_cfg.milvus.collection) == contents(ingested[1])


def test_ctrl_c_stops_cleanly_in_one_line(corpus_slice, tmp_path):
    env = _cli_env(tmp_path / "interrupted.db")
    process = _start_ingest(corpus_slice, env)
    _wait_for_first_write(process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "rag-app: interrupted"
