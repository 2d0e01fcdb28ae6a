"""One collection per knowledge base: --collection on every command, and rag-app collections."""

from __future__ import annotations

import subprocess
import sys

from conftest import PROFILE


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rag_app.cli", *args, "--config", str(PROFILE)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_collections_are_listed_and_dropped_only_when_confirmed(tmp_path):
    env = {"RAG_APP_MILVUS__URI": str(tmp_path / "kb.db"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    pages = {"team_a": "Partitions split a collection.", "team_b": "HNSW is a graph."}
    for name, text in pages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "page.md").write_text(f"# Page\n{text}\n")
        done = run("ingest", str(tmp_path / name), "--collection", name, env=env)
        assert done.returncode == 0, done.stderr

    listed = run("collections", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert rows == [
        ["team_a", "1", "384", "yes", "all-MiniLM-L6-v2"],
        ["team_b", "1", "384", "yes", "all-MiniLM-L6-v2"],
    ]

    refused = run("collections", "--drop", "team_a", env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "rag-app: error: dropping 'team_a' deletes its documents for good: add --yes to confirm"
    )
    assert "team_a" in run("collections", env=env).stdout

    dropped = run("collections", "--drop", "team_a", "--yes", env=env)
    assert dropped.returncode == 0 and dropped.stdout.strip() == "dropped team_a"
    assert [line.split()[0] for line in run("collections", env=env).stdout.splitlines()[1:]] == [
        "team_b"
    ]
    missing = run("collections", "--drop", "nope", "--yes", env=env)
    assert missing.returncode == 2 and "no collection 'nope'" in missing.stderr
