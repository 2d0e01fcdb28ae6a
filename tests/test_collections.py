"""One collection per knowledge base: --collection on every command, and rag-app collections."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import PROFILE

from rag_app import build_index, build_retriever, load_config

pytestmark = pytest.mark.slow


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
        ["team_a", "1", "384", "yes", "FLAT/IP", "all-MiniLM-L6-v2"],
        ["team_b", "1", "384", "yes", "FLAT/IP", "all-MiniLM-L6-v2"],
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


def test_index_settings_apply_to_new_collections_and_are_described(tmp_path, embed_model):
    env = {
        "RAG_APP_MILVUS__URI": str(tmp_path / "kb.db"), "HF_HUB_OFFLINE": "1", "PATH": "",
        "RAG_APP_MILVUS__INDEX_TYPE": "HNSW", "RAG_APP_MILVUS__METRIC": "COSINE",
        "RAG_APP_MILVUS__SEARCH_PARAMS": '{"ef": 32}',
    }  # fmt: skip
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "page.md").write_text("# Page\nHNSW is a graph index.\n")
    assert run("ingest", str(tmp_path / "kb"), "--collection", "graph", env=env).returncode == 0

    described = run("collections", "--describe", "graph", env=env)
    assert described.returncode == 0, described.stderr
    info = json.loads(described.stdout)
    assert (info["name"], info["rows"], info["index_type"], info["metric"]) == (
        "graph", 1, "HNSW", "COSINE",
    )  # fmt: skip
    missing = run("collections", "--describe", "nope", env=env)
    assert missing.returncode == 2 and "no collection 'nope'" in missing.stderr

    cfg = load_config(
        PROFILE, milvus__uri=str(tmp_path / "kb.db"), milvus__collection="graph",
        milvus__search_params={"ef": 32}, retrieval__mode="dense",
    )  # fmt: skip
    hits = build_retriever(cfg, build_index(cfg, embed_model=embed_model)).retrieve("HNSW?")
    assert [hit.node.metadata["source"] for hit in hits] == ["page.md"]  # searched with ef
