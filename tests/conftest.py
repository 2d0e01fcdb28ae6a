"""Shared, real test components: the offline MiniLM and SmolLM2 models, Milvus Lite files,
one in-process vLLM engine and one ``vllm serve``-equivalent process per test session.

Tiers (markers, registered in pyproject.toml and enforced with ``--strict-markers``):
``slow`` loads a model or opens Milvus, ``llm`` needs a vLLM engine, ``server`` starts a
server process. A test is put in a tier by the fixtures it uses (:data:`TIER_FIXTURES`)
or by its own marker; an unmarked test is in the fast tier (``-m "not slow and not llm and
not server"``), which loads no model and runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "configs" / "cpu-small.toml"
CORPUS = REPO.parent / "shared" / "corpora" / "milvus-docs"
# Pages of the Milvus docs that talk about index parameters, next to the in-memory index
# page (reference/index.md): close competitors for the HNSW question, not easy filler.
SLICE = [
    "reference/index.md",
    "reference/disk_index.md",
    "reference/gpu_index.md",
    "reference/scalar_index.md",
    "reference/metric.md",
    "reference/consistency.md",
    "reference/mmap.md",
    "reference/replica.md",
    "reference/multi_tenancy.md",
    "reference/reranking.md",
]
HNSW_QUESTION = "What do the parameters for HNSW mean?"


TIERS = ("slow", "llm", "server")
# Fixtures that put every test using them (directly or through other fixtures) in a tier.
TIER_FIXTURES = {
    "slow": {"embed_model", "ingested", "session_index", "store_cfg", "slice_index", "cli_env"},
    "llm": {"local_llm", "vllm_server", "rag_server"},
    "server": {"milvus_server", "server_slice", "vllm_server", "server_cfg", "rag_server"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for tier, fixtures in TIER_FIXTURES.items():
            if used & fixtures and item.get_closest_marker(tier) is None:
                item.add_marker(getattr(pytest.mark, tier))
        # An llm or server test is slow too: `-m "not slow"` leaves them all out.
        if any(item.get_closest_marker(t) for t in ("llm", "server")):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    missing = [
        p
        for p in ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct")
        if not (REPO / ".models" / p / "config.json").is_file()
    ]
    if missing:
        raise pytest.UsageError(
            f"offline models missing in .models/: {', '.join(missing)}; "
            "run `.venv/bin/python scripts/fetch_models.py` first"
        )
    if not CORPUS.is_dir():
        raise pytest.UsageError(f"test corpus not found at {CORPUS}")


@pytest.fixture
def small_cfg(tmp_path: Path):
    """The CPU profile on a fresh Milvus Lite file of this test's own."""
    from rag_app import load_config

    return load_config(PROFILE, milvus__uri=str(tmp_path / "milvus.db"))


MILVUS_SERVER = REPO / "scripts" / "milvus_server.py"


def milvus_server_command(*args: str | Path) -> str:
    """Run scripts/milvus_server.py as a user would; returns what it printed."""
    done = subprocess.run(
        [sys.executable, str(MILVUS_SERVER), *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus server process on 127.0.0.1 for the session, started and stopped with
    scripts/milvus_server.py; yields its uri. Tests give their collections unique names."""
    data_dir = tmp_path_factory.mktemp("milvus-server")
    uri = milvus_server_command("start", "--data-dir", data_dir, "--port", "0")
    pid = json.loads((data_dir / "server.json").read_text())["pid"]
    yield uri
    milvus_server_command("stop", "--data-dir", data_dir)
    assert not process_running(pid), "the Milvus server outlived `stop`"


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one that no parent reaped yet is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(params=["lite", "server"])
def store_cfg(request: pytest.FixtureRequest, tmp_path: Path):
    """The CPU profile on a fresh collection: in a Milvus Lite file of this test's own, then
    on the session's Milvus server."""
    from rag_app import load_config

    if request.param == "lite":
        return load_config(PROFILE, milvus__uri=str(tmp_path / "milvus.db"))
    uri = request.getfixturevalue("milvus_server")
    return load_config(PROFILE, milvus__uri=uri, milvus__collection=f"t_{uuid.uuid4().hex}")


def contents(client_or_store, collection: str | None = None) -> set[tuple[str, str, str]]:
    """Every row as (chunk id, document id, text)."""
    client = getattr(client_or_store, "client", client_or_store)
    name = collection or client_or_store.collection_name
    rows = client.query(name, filter='id != ""', output_fields=["id", "doc_id", "text"])
    return {(r["id"], r["doc_id"], r["text"]) for r in rows}


def fresh_contents(cfg, embed_model, folder: Path, tmp_path: Path) -> set[tuple[str, str, str]]:
    """What a first ingest of ``folder`` into an empty collection holds."""
    other = cfg.model_copy(deep=True)
    other.milvus.uri = str(tmp_path / "fresh.db")
    from rag_app import build_vector_store, ingest_path

    store = build_vector_store(other, embed_model)
    ingest_path(other, folder, embed_model=embed_model, vector_store=store)
    return contents(store)


@pytest.fixture(scope="session")
def embed_model():
    from rag_app import build_embed_model, load_config

    return build_embed_model(load_config(PROFILE))


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("milvus-docs")
    for page in SLICE:
        (root / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / page, root / page)
    return root


@pytest.fixture(scope="session")
def session_cfg(tmp_path_factory: pytest.TempPathFactory):
    from rag_app import load_config

    return load_config(PROFILE, milvus__uri=str(tmp_path_factory.mktemp("store") / "milvus.db"))


@pytest.fixture(scope="session")
def ingested(session_cfg, corpus_slice, embed_model):
    """The corpus slice ingested once into the session's Milvus Lite file."""
    from rag_app import build_vector_store, ingest_path

    store = build_vector_store(session_cfg, embed_model)
    report = ingest_path(session_cfg, corpus_slice, embed_model=embed_model, vector_store=store)
    return report, store


@pytest.fixture(scope="session")
def session_index(session_cfg, ingested, embed_model):
    from rag_app import build_index

    return build_index(session_cfg, embed_model=embed_model, vector_store=ingested[1])


@pytest.fixture(scope="session")
def server_slice(milvus_server, corpus_slice, embed_model):
    """The corpus slice ingested once into a collection on the session's Milvus server."""
    from rag_app import build_index, build_vector_store, ingest_path, load_config

    cfg = load_config(PROFILE, milvus__uri=milvus_server, milvus__collection="slice")
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, corpus_slice, embed_model=embed_model, vector_store=store)
    return cfg, build_index(cfg, embed_model=embed_model, vector_store=store)


@pytest.fixture(params=["lite", "server"])
def slice_index(request: pytest.FixtureRequest):
    """(config, index) over the ingested corpus slice: in the Lite file, then on the server."""
    if request.param == "lite":
        return request.getfixturevalue("session_cfg"), request.getfixturevalue("session_index")
    return request.getfixturevalue("server_slice")


@pytest.fixture(scope="session")
def local_llm(session_cfg) -> Iterator:
    """One in-process vLLM engine on SmolLM2 for the whole session (~40 s to start)."""
    from rag_app import build_llm

    llm = build_llm(session_cfg)
    yield llm
    llm.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server on 127.0.0.1, serving SmolLM2; yields /v1 URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(REPO / ".models" / "SmolLM2-135M-Instruct"),
        "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager",
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready in 300 s: {log.read_text()[-3000:]}")
            time.sleep(1)
        yield base + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server_cfg(session_cfg, vllm_server):
    from rag_app import load_config

    return load_config(
        PROFILE,
        milvus__uri=session_cfg.milvus.uri,
        llm={"mode": "server", "api_base": vllm_server, "model": "smollm2"},
    )


# rag-app serve: one process for the session, with one key for everything and one limited
# to the second collection.
SERVE_KEYS = {"full": "sk-test-full-3f9a1c07d2", "team": "sk-test-team-8b64e5a190"}
SERVE_PAGES = ["reference/index.md", "reference/consistency.md", "reference/metric.md",
               "reference/mmap.md"]  # fmt: skip
TEAM_PAGE = "reference/replica.md"


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, their children ...)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class RagServer:
    """A real ``rag-app serve`` process on 127.0.0.1 (SmolLM2 in vLLM, a Milvus Lite file).
    ``ensure()`` starts it again if a test stopped it (the SIGTERM test does)."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.loading_reply: tuple[int, dict] | None = None  # a request while loading

    def start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.root / f"serve-{port}.log"
        command = [sys.executable, "-m", "rag_app.cli", "serve", "--port", str(port),
                   "--secrets", str(self.root / "secrets.env")]  # fmt: skip
        with self.log_path.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rag-app serve exited: {self.log()[-3000:]}")
            status = _status(self.url + "/readyz")
            if status == 200:
                return
            if status == 503 and self.loading_reply is None:
                self.loading_reply = _get(self.url + "/v1/models", SERVE_KEYS["full"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"rag-app serve not ready in 300 s: {self.log()[-3000:]}")
            time.sleep(0.5)

    def ensure(self) -> RagServer:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict:
        status, body = _get(self.url + "/metrics", SERVE_KEYS["full"])
        assert status == 200, body
        return body


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _get(url: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return int(reply.status), json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


@pytest.fixture(scope="session")
def rag_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagServer]:
    """``rag-app serve`` for the whole session over two collections: ``rag_docs`` (a few
    Milvus reference pages) and ``team_kb`` (one);
    API keys from a secrets file, the full one and one limited to ``team_kb``. A small
    admission gate (2 answering, 2 waiting), so that 429 can be reached."""
    root = tmp_path_factory.mktemp("rag-serve")
    for folder, pages in (("docs", SERVE_PAGES), ("team", [TEAM_PAGE])):
        for page in pages:
            (root / folder / page).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CORPUS / page, root / folder / page)
    keys = f"{SERVE_KEYS['full']},{SERVE_KEYS['team']}:team_kb"
    (root / "secrets.env").write_text(f"RAG_APP_SERVER__API_KEYS={keys}\n")
    env = {
        **os.environ,
        "RAG_APP_CONFIG": str(PROFILE),
        "RAG_APP_MILVUS__URI": str(root / "serve.db"),
        "RAG_APP_SERVER__MAX_CONCURRENT": "2",
        "RAG_APP_SERVER__MAX_QUEUE": "2",
        "RAG_APP_SERVER__SHUTDOWN_TIMEOUT": "60",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    # Both collections in one child process (one model load), which then frees the file.
    ingest = (
        "import sys\n"
        "from rag_app import build_embed_model, ingest_path, load_config\n"
        "model = build_embed_model(load_config())\n"
        "for folder, name in (('docs', 'rag_docs'), ('team', 'team_kb')):\n"
        "    cfg = load_config(milvus__collection=name)\n"
        "    ingest_path(cfg, sys.argv[1] + '/' + folder, embed_model=model, progress=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", ingest, str(root)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = RagServer(root, env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
