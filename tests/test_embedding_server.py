"""``embedding.mode = "server"``: vectors from a real vLLM embedding server on 127.0.0.1
(the pooling runner over the offline MiniLM) against the same model in-process.

The server's vectors match the in-process fp32 ones, an ingest through it writes the same
chunks with the same vectors and retrieves alike, a server killed and restarted during an
ingest costs the ingest a pause, not its result, and failures are one line. Concurrency is
observed with a fake server whose only job is to see how many requests arrive together.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    CORPUS,
    HNSW_QUESTION,
    PROFILE,
    SLICE,
    EmbeddingServer,
    _free_port,
    contents,
)

from rag_app import load_config
from rag_app.errors import RagAppError

SECRET = "sk-embed-secret-0815"
QUESTIONS = [
    HNSW_QUESTION,
    "How does Milvus decide consistency levels?",
    "What is memory-mapped storage used for?",
    "Which metric types does Milvus support?",
]


def server_cfg(url: str, milvus_uri: str = "unused.db", **embedding: Any):
    """The CPU profile in server mode (the profile's MiniLM folder: its name is sent)."""
    return load_config(
        PROFILE,
        milvus__uri=milvus_uri,
        embedding={
            "mode": "server", "api_base": url, "api_key": SECRET, "precision": "fp32",
            "extra_body": {"truncate_prompt_tokens": -1}, **embedding,
        },
    )  # fmt: skip


def local_cfg(milvus_uri: str = "unused.db"):
    return load_config(PROFILE, milvus__uri=milvus_uri, embedding__precision="fp32")


@pytest.fixture(scope="module")
def fp32_model():
    """The same MiniLM in-process, in fp32 as the server runs it."""
    from rag_app import build_embed_model

    return build_embed_model(local_cfg())


def passages(count: int = 24) -> list[str]:
    """Real passages of the Milvus docs, of all lengths (some beyond the 256-token limit)."""
    texts: list[str] = []
    for page in sorted((CORPUS / "reference").glob("*.md")):
        for block in page.read_text().split("\n\n"):
            if len(block.strip()) > 80:
                texts.append(block.strip())
                break
        if len(texts) == count:
            break
    texts.append(page.read_text())  # a whole page: truncated by both, alike
    return texts


def cosines(a: list[list[float]], b: list[list[float]]) -> np.ndarray:
    left, right = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (left * right).sum(1) / np.linalg.norm(left, axis=1) / np.linalg.norm(right, axis=1)


# -- vectors --------------------------------------------------------------------------------


def test_server_vectors_match_the_in_process_ones(embedding_server, fp32_model):
    from rag_app import build_embed_model

    model = build_embed_model(server_cfg(embedding_server.url, batch_size=8))
    texts = passages()
    served = model.get_text_embedding_batch(texts)
    local = fp32_model.get_text_embedding_batch(texts)
    assert cosines(served, local).min() >= 0.999
    assert np.allclose(np.linalg.norm(np.asarray(served, dtype=np.float32), axis=1), 1, atol=1e-6)
    query = model.get_query_embedding(HNSW_QUESTION)
    assert cosines([query], [fp32_model.get_query_embedding(HNSW_QUESTION)])[0] >= 0.999


def test_the_query_instruction_goes_on_queries_only(embedding_server, fp32_model):
    from rag_app import build_embed_model

    prefix = "Represent this sentence for searching relevant passages: "
    model = build_embed_model(server_cfg(embedding_server.url, query_instruction=prefix))
    [plain] = fp32_model.get_text_embedding_batch([prefix + HNSW_QUESTION])
    assert cosines([model.get_query_embedding(HNSW_QUESTION)], [plain])[0] >= 0.999
    [text] = fp32_model.get_text_embedding_batch([HNSW_QUESTION])
    assert cosines([model.get_text_embedding(HNSW_QUESTION)], [text])[0] >= 0.999


def test_server_mode_imports_no_torch(embedding_server):
    probe = (
        "import sys\n"
        "from rag_app import load_config\n"
        "from rag_app.components.embedding import build_embed_model, embedding_dimension,"
        " token_counter\n"
        "cfg = load_config(embedding__mode='server', embedding__api_base=sys.argv[1])\n"
        "model = build_embed_model(cfg)\n"
        "count, limit = token_counter(model)\n"
        "print(embedding_dimension(model), limit, count('HNSW graphs'),"
        " len(model.get_query_embedding('x')), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "RAG_APP_CONFIG": str(PROFILE)}
    done = subprocess.run([sys.executable, "-c", probe, embedding_server.url], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["384", "256", "6", "384", "False"]


# -- ingest ---------------------------------------------------------------------------------


def vectors(store) -> dict[str, list[float]]:
    rows = store.client.query(
        store.collection_name, filter='id != ""', output_fields=["id", "embedding"],
        consistency_level="Strong",
    )  # fmt: skip
    return {row["id"]: row["embedding"] for row in rows}


@pytest.fixture(scope="module")
def local_ingest(corpus_slice, fp32_model, tmp_path_factory):
    """The corpus slice ingested in-process (fp32): what a server ingest must equal."""
    from rag_app import build_vector_store, ingest_path

    cfg = local_cfg(str(tmp_path_factory.mktemp("local") / "milvus.db"))
    store = build_vector_store(cfg, fp32_model)
    ingest_path(cfg, corpus_slice, embed_model=fp32_model, vector_store=store, progress=False)
    return cfg, store


def dense(cfg):
    cfg = cfg.model_copy(deep=True)
    cfg.retrieval.mode = "dense"
    return cfg


def assert_same_ingest(cfg, store, local_ingest, fp32_model) -> None:
    """Same rows, vectors within cosine 0.999, same dense top-5 for the questions."""
    from rag_app import build_embed_model, build_index, build_retriever

    local_cfg_, local_store = local_ingest
    assert contents(store) == contents(local_store)
    ours, theirs = vectors(store), vectors(local_store)
    ids = sorted(theirs)
    assert cosines([ours[i] for i in ids], [theirs[i] for i in ids]).min() >= 0.999
    served = build_index(cfg, embed_model=build_embed_model(cfg), vector_store=store)
    local = build_index(local_cfg_, embed_model=fp32_model, vector_store=local_store)
    for question in QUESTIONS:
        got = build_retriever(dense(cfg), served, top_k=5).retrieve(question)
        want = build_retriever(dense(local_cfg_), local, top_k=5).retrieve(question)
        assert [hit.node.node_id for hit in got] == [hit.node.node_id for hit in want], question


def test_an_ingest_through_the_server_equals_the_in_process_one(
    embedding_server, corpus_slice, local_ingest, fp32_model, tmp_path
):
    from rag_app import ingest_path

    cfg = server_cfg(embedding_server.url, str(tmp_path / "milvus.db"), batch_size=8)
    report = ingest_path(cfg, corpus_slice, progress=False)
    assert report.added == len(SLICE) and report.chunks == len(contents(local_ingest[1]))
    from rag_app import build_vector_store

    assert_same_ingest(cfg, build_vector_store(cfg), local_ingest, fp32_model)


class _KillOnce:
    """A LlamaIndex event handler that SIGKILLs the embedding server when the ``after``-th
    batch starts (while earlier batches are in flight), then starts it again on the same
    port, without waiting: the ingest's retries have to carry it through."""

    def __init__(self, server: EmbeddingServer, after: int) -> None:
        from llama_index.core.instrumentation.event_handlers import BaseEventHandler
        from llama_index.core.instrumentation.events.embedding import EmbeddingStartEvent

        outer = self

        class Handler(BaseEventHandler):
            def handle(self, event: Any, **kwargs: Any) -> None:
                if isinstance(event, EmbeddingStartEvent):
                    outer.seen(event)

        self.handler = Handler()
        self.server, self.after, self.batches, self.killed = server, after, 0, threading.Event()
        self._lock = threading.Lock()

    def seen(self, event: Any) -> None:
        with self._lock:
            self.batches += 1
            if self.batches != self.after:
                return
        self.server.kill()
        self.killed.set()
        self.server.start()

    def __enter__(self) -> _KillOnce:
        from llama_index.core.instrumentation import get_dispatcher

        get_dispatcher().add_event_handler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        from llama_index.core.instrumentation import get_dispatcher

        get_dispatcher().event_handlers.remove(self.handler)


def test_an_ingest_survives_the_server_killed_and_restarted(
    embedding_server, corpus_slice, local_ingest, fp32_model, tmp_path
):
    from rag_app import build_embed_model, build_vector_store, ingest_path

    # ~3 minutes of retries (0.5 s doubling to 8 s, 30 times): a restart takes ~40-80 s here.
    cfg = server_cfg(embedding_server.url, str(tmp_path / "milvus.db"), batch_size=8,
                     max_retries=30)  # fmt: skip
    model = build_embed_model(cfg)
    store = build_vector_store(cfg, model)
    starts = embedding_server.starts
    try:
        with _KillOnce(embedding_server, after=3) as killer:
            report = ingest_path(cfg, corpus_slice, embed_model=model, vector_store=store,
                                 progress=False)  # fmt: skip
        assert killer.killed.is_set() and embedding_server.starts == starts + 1
        assert killer.batches > 3  # batches went on after the kill
    finally:
        embedding_server.wait_ready()  # for the tests after this one
    assert report.added == len(SLICE)
    assert_same_ingest(cfg, store, local_ingest, fp32_model)


# -- failures -------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rag_app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert SECRET not in result.stderr + result.stdout
    return lines[0].removeprefix("rag-app: error: ")


def cli_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAG_APP_CONFIG": str(PROFILE),
        "RAG_APP_MILVUS__URI": str(tmp_path / "cli.db"),
        "RAG_APP_EMBEDDING__MODE": "server",
        "RAG_APP_EMBEDDING__API_BASE": url,
        "RAG_APP_EMBEDDING__API_KEY": SECRET,
        **extra,
    }


@pytest.mark.slow
def test_cli_ingest_with_the_server_down_fails_in_one_line(corpus_slice, tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    result = run_cli(cli_env(tmp_path, url), "ingest", str(corpus_slice))
    assert one_error_line(result) == (
        f"cannot reach the embedding server at {url}: connection refused (after 5 tries; "
        "start it, or check embedding.api_base)"
    )


def test_cli_ingest_naming_a_model_the_server_lacks_fails_in_one_line(
    embedding_server, corpus_slice, tmp_path
):
    env = cli_env(tmp_path, embedding_server.url, RAG_APP_EMBEDDING__MODEL="bge-small")
    result = run_cli(env, "ingest", str(corpus_slice))
    assert one_error_line(result) == (
        f"the embedding server at {embedding_server.url} does not serve model 'bge-small' "
        "(it serves: all-MiniLM-L6-v2; set embedding.model to one of them)"
    )


def test_server_mode_needs_an_api_base():
    needs = re.escape("embedding.mode = 'server' needs embedding.api_base")
    with pytest.raises(RagAppError, match=needs):
        load_config(PROFILE, embedding__mode="server")


# -- batches in flight ------------------------------------------------------------------------


class CountingServer(http.server.ThreadingHTTPServer):
    """A fake /v1/embeddings that counts the requests being answered at once. Each batch is
    held until two requests have been in at the same time (at most 30 s): a client that
    sends one batch after another waits out that hold on every batch, and the peak stays 1."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CountingHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self.together = threading.Event()
        self.lock = threading.Lock()
        self.now = self.peak = self.requests = 0
        self.sizes: list[int] = []


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    server: CountingServer
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        server = self.server
        with server.lock:
            server.now += 1
            server.requests += 1
            server.peak = max(server.peak, server.now)
            server.sizes.append(len(body["input"]))
        if server.peak >= 2:
            server.together.set()
        if len(body["input"]) > 1:  # a batch, not the one-text dimension probe
            server.together.wait(30)
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), 1.0, 0.0, 2.0]}
            for i, text in enumerate(body["input"])
        ]
        with server.lock:
            server.now -= 1
        reply = json.dumps({"object": "list", "data": data, "model": body["model"],
                            "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[CountingServer]:
    server = CountingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_several_batches_are_in_flight_at_once(counting_server):
    from rag_app import build_embed_model

    cfg = server_cfg(counting_server.url, batch_size=4, max_in_flight=2)
    model = build_embed_model(cfg)
    texts = [f"text number {i}" for i in range(16)]
    vectors_ = model.get_text_embedding_batch(texts)
    assert counting_server.requests == 4 and counting_server.sizes == [4, 4, 4, 4]
    assert counting_server.peak == 2  # two at once, never more than max_in_flight
    expected = np.asarray([[len(t), 1.0, 0.0, 2.0] for t in texts], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors_, expected, atol=1e-6)  # in order, each of unit length


def test_async_batches_are_in_flight_at_once(counting_server):
    import asyncio

    from rag_app import build_embed_model

    model = build_embed_model(server_cfg(counting_server.url, batch_size=4, max_in_flight=2))
    vectors_ = asyncio.run(model.aget_text_embedding_batch([f"t{i}" for i in range(16)]))
    assert len(vectors_) == 16 and counting_server.peak == 2


@pytest.mark.slow
def test_an_ingest_keeps_max_in_flight_batches_in_flight(counting_server, corpus_slice, tmp_path):
    from rag_app import ingest_path

    cfg = server_cfg(counting_server.url, str(tmp_path / "milvus.db"), batch_size=8,
                     max_in_flight=2, tokenizer=str(EmbeddingServer.MODEL))  # fmt: skip
    report = ingest_path(cfg, corpus_slice, progress=False)
    assert report.chunks > 8 * 4
    assert counting_server.peak == 2


def test_credentials_in_api_base_become_the_api_key_and_are_never_shown():
    cfg = load_config(
        PROFILE, embedding__mode="server", embedding__api_base="https://u:sk-in-url-2718@h/v1"
    )
    assert cfg.embedding.api_base == "https://h/v1"
    assert cfg.embedding.api_key.get_secret_value() == "u:sk-in-url-2718"
    error = RagAppError(f"failed with key {cfg.embedding.api_key.get_secret_value()}")
    assert "sk-in-url-2718" not in str(error)
