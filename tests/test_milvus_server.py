"""A real Milvus server process (scripts/milvus_server.py): shared by several processes,
stopped and killed under a running ingest, and never left with missing or doubled chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    LOOPBACK,
    PROFILE,
    contents,
    fresh_contents,
    listening_sockets,
    milvus_server_command,
    process_running,
    server_pid,
)
from llama_index.core.schema import NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode
from pymilvus import MilvusClient

from rag_app import build_vector_store, ingest_path, load_config
from rag_app.components.retrieval import NewestVersion


def cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "--config", str(PROFILE), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
    )  # fmt: skip


def rows(uri: str, collection: str) -> set[tuple[str, str, str]]:
    client = MilvusClient(uri=uri)
    client.load_collection(collection)
    found = contents(client, collection)
    client.close()
    return found


def wait_for_rows(uri: str, collection: str, timeout: float = 120) -> None:
    """Return once the collection holds some rows: the ingest is writing."""
    client = MilvusClient(uri=uri)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if client.has_collection(collection):
                client.load_collection(collection)
                count = client.query(collection, filter='id != ""', output_fields=["count(*)"])
                if count[0]["count(*)"] > 0:
                    return
            time.sleep(0.1)
    finally:
        client.close()
    raise AssertionError("the ingest wrote nothing")


def read_until(process: subprocess.Popen[str], text: str) -> str:
    """The process's stderr up to and including the first line holding ``text``."""
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the process ended without printing {text!r}: {''.join(seen)}")


@pytest.fixture
def own_server(tmp_path: Path):
    """A server of this test's own, to kill; yields (uri, data dir); always stopped."""
    data_dir = tmp_path / "server"
    uri = milvus_server_command("start", "--data-dir", data_dir, "--port", "0")
    yield uri, data_dir
    milvus_server_command("stop", "--data-dir", data_dir)


@pytest.mark.server
def test_the_script_serves_on_loopback_only_and_stop_leaves_no_process(tmp_path):
    data_dir = tmp_path / "server"
    uri = milvus_server_command("start", "--data-dir", data_dir, "--port", "0")
    pid = server_pid(data_dir)
    try:
        assert uri.startswith("http://127.0.0.1:")
        port = int(uri.rsplit(":", 1)[1])
        found = listening_sockets(pid)
        assert list(found) == ["host"]
        assert {port for _, port in found["host"]} == {port}
        assert {address for address, _ in found["host"]} <= LOOPBACK  # never 0.0.0.0
        assert milvus_server_command("start", "--data-dir", data_dir) == uri  # already running
        assert milvus_server_command("status", "--data-dir", data_dir).startswith(uri)
    finally:
        milvus_server_command("stop", "--data-dir", data_dir)
    assert not process_running(pid)
    assert not (data_dir / "server.json").exists()


@pytest.mark.slow
def test_an_unreachable_milvus_is_a_one_line_error(tmp_path):
    closed = "http://127.0.0.1:9"  # nothing listens on the discard port
    (tmp_path / "page.md").write_text("# Page\nText.\n")
    for command in (["collections"], ["ingest", str(tmp_path)]):
        done = cli(*command, env={"RAG_APP_MILVUS__URI": closed})
        assert done.returncode == 2
        assert (
            done.stderr.strip()
            .splitlines()[-1]
            .startswith("rag-app: error: cannot connect to Milvus at http://127.0.0.1:9")
        )
        assert "Traceback" not in done.stderr


def test_milvus_restarting_mid_ingest_is_waited_for_and_nothing_is_lost(
    own_server, corpus_slice, embed_model, tmp_path
):
    uri, data_dir = own_server
    env = {"RAG_APP_MILVUS__URI": uri, "RAG_APP_MILVUS__TIMEOUT": "60"}
    ingest = subprocess.Popen(
        [sys.executable, "-m", "rag_app.cli", "--config", str(PROFILE), "ingest",
         str(corpus_slice), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip
    wait_for_rows(uri, "rag_docs")
    os.kill(server_pid(data_dir), signal.SIGKILL)  # the server dies mid-ingest
    seen = read_until(ingest, "unreachable; retrying")  # the ingest waits for it ...
    milvus_server_command("start", "--data-dir", data_dir, "--port", uri.rsplit(":", 1)[1])
    out, err = ingest.communicate(timeout=300)  # ... and goes on once it is back
    err = seen + err
    assert ingest.returncode == 0, err
    assert "ingested 10 documents" in out
    assert rows(uri, "rag_docs") == fresh_contents(
        load_config(PROFILE), embed_model, corpus_slice, tmp_path
    )


def test_milvus_gone_mid_ingest_fails_in_one_line_and_a_rerun_completes(
    own_server, corpus_slice, embed_model, tmp_path
):
    uri, data_dir = own_server
    env = {"RAG_APP_MILVUS__URI": uri, "RAG_APP_MILVUS__TIMEOUT": "3"}
    command = [sys.executable, "-m", "rag_app.cli", "--config", str(PROFILE), "ingest",
               str(corpus_slice), "--no-progress"]  # fmt: skip
    ingest = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )  # fmt: skip
    wait_for_rows(uri, "rag_docs")
    os.kill(server_pid(data_dir), signal.SIGKILL)
    _, err = ingest.communicate(timeout=300)
    assert ingest.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rag-app: error: Milvus at {uri} is unreachable"), err[-2000:]
    assert "run the same command again" in last
    assert "Traceback" not in err

    milvus_server_command("start", "--data-dir", data_dir, "--port", uri.rsplit(":", 1)[1])
    again = cli("ingest", str(corpus_slice), "--no-progress", env=env)
    assert again.returncode == 0, again.stderr
    assert rows(uri, "rag_docs") == fresh_contents(
        load_config(PROFILE), embed_model, corpus_slice, tmp_path
    )


READER = textwrap.dedent(
    """
    import json, os, sys
    from rag_app import build_index, build_retriever, load_config
    cfg = load_config(sys.argv[1], milvus__uri=sys.argv[2], retrieval__top_k=20,
                      retrieval__dedupe=False)
    retriever = build_retriever(cfg, build_index(cfg))
    print("ready", flush=True)
    while not os.path.exists(sys.argv[3]):
        try:
            found = retriever.retrieve("How are replicas and shards balanced?")
            print(json.dumps(sorted({n.node.metadata["doc_hash"] for n in found
                                     if n.node.ref_doc_id == "changing.md"})), flush=True)
        except Exception as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
    """
)


def test_readers_see_the_old_or_the_new_version_while_a_writer_changes_it(
    milvus_server, embed_model, tmp_path
):
    collection = f"t_readers_{os.getpid()}"
    cfg = load_config(PROFILE, milvus__uri=milvus_server, milvus__collection=collection)
    folder = tmp_path / "docs"
    folder.mkdir()
    long = "# Replicas\n" + "Replicas and shards are balanced across query nodes. " * 80
    short = "# Replicas\nReplicas and shards are balanced by the coordinator.\n"
    page = folder / "changing.md"
    page.write_text(long)
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)

    stop = tmp_path / "stop"
    env = {**os.environ, "RAG_APP_MILVUS__COLLECTION": collection}
    logs = [tmp_path / f"reader{n}.log" for n in range(2)]
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(PROFILE), milvus_server, str(stop)],
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        for log in logs
    ]
    seen: list[list[str] | dict[str, str]] = []
    for reader in readers:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    collectors = [
        threading.Thread(target=lambda out=r.stdout: seen.extend(json.loads(ln) for ln in out))
        for r in readers
    ]
    for collector in collectors:
        collector.start()

    def read_versions() -> set[str]:
        return {h for hashes in list(seen) if isinstance(hashes, list) for h in hashes}

    written = set()
    turn, deadline = 0, time.monotonic() + 120
    # The document alternates between 12 chunks and 1, at least 8 times and until the readers
    # have read both (a loaded machine may answer few reads per write).
    while turn < 8 or (len(read_versions()) < 2 and time.monotonic() < deadline):
        page.write_text(short if turn % 2 == 0 else long)
        ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
        written |= {r["doc_hash"] for r in store.client.query(
            collection, filter='id != ""', output_fields=["doc_hash"])}  # fmt: skip
        turn += 1
    stop.touch()
    for reader, collector, log in zip(readers, collectors, logs, strict=True):
        assert reader.wait(timeout=120) == 0, log.read_text()[-2000:]
        collector.join(timeout=10)
    assert len(seen) > 8  # reads happened throughout
    assert [s for s in seen if isinstance(s, dict)] == []  # no reader ever failed
    assert all(len(hashes) == 1 for hashes in seen)  # one version of the document per read
    assert read_versions() == written and len(written) == 2  # both versions were read, at times


def test_newest_version_keeps_one_version_of_each_document():
    def chunk(doc: str, n: int, doc_hash: str, written: float) -> NodeWithScore:
        node = TextNode(id_=f"{doc}#{n}", text=f"{doc} {n}")
        node.metadata = {"doc_hash": doc_hash, "written_at": written}
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=doc)
        return NodeWithScore(node=node, score=1.0 - n / 10)

    nodes = [chunk("a", 0, "new", 2.0), chunk("a", 7, "old", 1.0), chunk("b", 0, "b1", 1.0)]
    kept = NewestVersion().postprocess_nodes(nodes)
    assert [n.node.node_id for n in kept] == ["a#0", "b#0"]


def test_a_read_between_an_updates_two_writes_sees_one_version(
    milvus_server, embed_model, tmp_path, monkeypatch
):
    """The writer upserts a changed document's chunks, then deletes the old version's other
    rows; pausing it between the two, a search finds rows of both versions in Milvus and
    still returns the chunks of one."""
    import threading

    import rag_app.pipelines.ingest as ingest_module
    from rag_app import build_index, build_retriever

    cfg = load_config(
        PROFILE, milvus__uri=milvus_server, milvus__collection=f"t_window_{os.getpid()}",
        retrieval__top_k=20, retrieval__dedupe=False,
    )  # fmt: skip
    folder = tmp_path / "docs"
    folder.mkdir()
    page = folder / "changing.md"
    page.write_text("# Replicas\n" + "Replicas and shards are balanced across nodes. " * 80)
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)

    paused, resume = threading.Event(), threading.Event()
    delete = ingest_module._delete_other_versions

    def paused_delete(*args):
        paused.set()
        resume.wait(60)
        delete(*args)

    monkeypatch.setattr(ingest_module, "_delete_other_versions", paused_delete)
    page.write_text("# Replicas\nReplicas and shards are balanced by the coordinator.\n")
    writer = threading.Thread(
        target=ingest_path, args=(cfg, folder), kwargs={"embed_model": embed_model}
    )
    writer.start()
    try:
        assert paused.wait(60)
        stored = store.client.query(
            cfg.milvus.collection, filter='id != ""', output_fields=["doc_hash"]
        )
        assert len({row["doc_hash"] for row in stored}) == 2  # both versions are in Milvus
        retriever = build_retriever(cfg, build_index(cfg, embed_model=embed_model))
        found = retriever.retrieve("How are replicas and shards balanced?")
        assert [n.node.get_content() for n in found] == [
            "# Replicas\nReplicas and shards are balanced by the coordinator."
        ]  # the new version only
    finally:
        resume.set()
        writer.join(60)
