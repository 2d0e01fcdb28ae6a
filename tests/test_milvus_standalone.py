"""A real Milvus (a 2.3 standalone: scripts/milvus_server.py --kind standalone) where it
differs from Milvus Lite: its network, consistency levels, index builds, restarts.

The ingest, sync and dense retrieval suites run on it too (the `standalone` parameter of
``store_cfg`` and ``slice_index``); Milvus 2.3 has no BM25."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import (
    HNSW_QUESTION,
    LOOPBACK,
    NO_STANDALONE,
    PROFILE,
    STANDALONE_BUILT_HERE,
    contents,
    interfaces,
    listening_sockets,
    milvus_server_command,
    process_group,
    server_pid,
    server_uri,
    standalone_cfg,
)
from pymilvus import MilvusClient

from rag_app import build_index, build_retriever, build_vector_store, ingest_path
from rag_app.cli import main as cli_main
from rag_app.components.vector_store import CollectionInfo, list_collections

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(not STANDALONE_BUILT_HERE, reason=NO_STANDALONE),
]

PAGES = {
    "partitions.md": "# Partitions\n" + "Partitions split a collection into parts. " * 30,
    "replicas.md": "# Replicas\n" + "Replicas copy segments to more query nodes. " * 30,
    "ttl.md": "# TTL\nA collection's time to live drops expired rows.",
}
QUESTION = "What do partitions do to a collection?"


def write_pages(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in PAGES.items():
        (folder / name).write_text(text)
    return folder


def described(cfg) -> CollectionInfo:
    (info,) = [i for i in list_collections(cfg) if i.name == cfg.milvus.collection]
    return info


def first_source(retriever) -> str:
    return str(retriever.retrieve(QUESTION)[0].node.metadata["source"])


def test_the_standalone_is_reachable_on_loopback_only(standalone_dir):
    """Milvus 2.3 listens on every interface; the script runs it in a network namespace of
    its own, whose only interface is loopback, and relays 127.0.0.1:PORT there."""
    pgid = server_pid(standalone_dir)
    found = listening_sockets(pgid)
    host = found.pop("host")
    assert {port for _, port in host} == {int(server_uri(standalone_dir).rsplit(":", 1)[1])}
    assert {address for address, _ in host} <= LOOPBACK
    assert found  # Milvus's own ports (19530, 9091, etcd's ...), in the namespace of its own
    assert len(process_group(pgid)) == 2  # the relay and Milvus
    assert all(interfaces(pid) == ["lo"] for pid in process_group(pgid))


@pytest.mark.parametrize("level", ["Strong", "Session", "Eventually"])
def test_a_search_right_after_an_ingest_sees_it_at_strong_and_session(
    milvus_standalone, embed_model, tmp_path, level
):
    """Lite reads every level as Strong; a server does not. Strong waits for every write,
    Session for this process's own; Eventually may search before the rows arrive, so it is
    only polled until it finds them."""
    cfg = standalone_cfg(milvus_standalone, milvus__consistency_level=level)
    ingest_path(cfg, write_pages(tmp_path / "docs"), embed_model=embed_model)
    retriever = build_retriever(cfg, build_index(cfg, embed_model=embed_model))
    found = retriever.retrieve(QUESTION)
    if level == "Eventually":
        print(f"Eventually: the first search found {len(found)} passages")
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            time.sleep(0.2)
            found = retriever.retrieve(QUESTION)
    assert found and found[0].node.metadata["source"] == "partitions.md"
    assert described(cfg).consistency_level == level


def test_an_hnsw_index_is_built_and_described(
    standalone_dir, standalone_slice, monkeypatch, capsys
):
    """A server indexes sealed segments (Lite searches everything exactly): once the corpus
    slice's segment is flushed, its HNSW index is built, `rag-app collections --describe`
    shows it, and searches go through it (with the configured ef)."""
    cfg, index = standalone_slice
    name, uri = cfg.milvus.collection, cfg.milvus.uri
    client = MilvusClient(uri=uri)
    chunks = len(contents(client, name))
    # Counted, not read from the statistics, which count flushed segments only (0 here).
    assert described(cfg).rows == chunks > 64

    client.flush(name)  # seals the growing segment: an index is built on sealed ones
    files = standalone_dir / "standalone" / "data" / "index_files"
    deadline = time.monotonic() + 120
    while (
        not list(files.rglob("HNSW"))
        or client.describe_index(name, "embedding")["indexed_rows"] < chunks
    ):
        assert time.monotonic() < deadline, f"no index: {client.describe_index(name, 'embedding')}"
        time.sleep(0.2)

    monkeypatch.setenv("RAG_APP_MILVUS__URI", uri)
    assert cli_main(["--config", str(PROFILE), "collections", "--describe", name]) == 0
    shown = capsys.readouterr()
    info = json.loads(shown.out)
    assert (info["rows"], info["index_type"], info["metric"], info["index_params"]) == (
        chunks, "HNSW", "IP", {"M": "16", "efConstruction": "200"},
    )  # fmt: skip
    found = build_retriever(cfg, index).retrieve(HNSW_QUESTION)
    assert found[0].node.metadata["source"] == "reference/index.md"


def test_a_restarted_standalone_is_searched_and_synced_as_before(embed_model, tmp_path):
    """After a restart a server's collections are released (or loading) until loaded: a
    long-lived process's store loads its collection and goes on searching, and an unchanged
    folder re-ingests with nothing embedded. `stop` leaves no process behind."""
    data_dir = tmp_path / "server"
    uri = milvus_server_command("start", "--kind", "standalone", "--data-dir", data_dir,
                                "--port", "0")  # fmt: skip
    try:
        cfg = standalone_cfg(uri)
        folder = write_pages(tmp_path / "docs")
        store = build_vector_store(cfg, embed_model)
        ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
        retriever = build_retriever(
            cfg, build_index(cfg, embed_model=embed_model, vector_store=store)
        )
        assert first_source(retriever) == "partitions.md"
        before = contents(store)

        pgid = server_pid(data_dir)
        assert milvus_server_command("status", "--data-dir", data_dir).startswith(uri)
        milvus_server_command("stop", "--data-dir", data_dir)
        assert process_group(pgid) == []  # the relay and Milvus, with its etcd
        milvus_server_command("start", "--kind", "standalone", "--data-dir", data_dir,
                              "--port", uri.rsplit(":", 1)[1])  # fmt: skip

        assert first_source(retriever) == "partitions.md"  # the same store, reloaded
        store.client.release_collection(cfg.milvus.collection)  # released for certain
        again = ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
        assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)
        assert contents(store) == before
    finally:
        milvus_server_command("stop", "--data-dir", data_dir)
