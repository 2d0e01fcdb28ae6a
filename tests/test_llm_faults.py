"""Server mode when the vLLM server is down, slow, or cuts a stream: bounded retries, then one
line naming the server and the fix, and nothing lost once the server is back.

Each fault is injected for real: a closed loopback port, a fake HTTP server that never
answers (or answers 503), and a TCP proxy in front of the real vLLM server that drops the
connection part-way through a streamed answer.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import CORPUS, HNSW_QUESTION, PROFILE, REPO, _free_port
from llama_index.core.llms import ChatMessage

from rag_app import build_llm, build_query_engine, load_config
from rag_app.errors import RagAppError

SECRET = "sk-faults-secret-4711"
MESSAGES = [ChatMessage(role="user", content="Count to five.")]


def server_cfg(api_base: str, milvus_uri: str = "unused.db", **llm: Any):
    return load_config(
        PROFILE,
        milvus__uri=milvus_uri,
        llm={"mode": "server", "api_base": api_base, "model": "smollm2", "api_key": SECRET, **llm},
    )


def closed_port_url() -> str:
    return f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there


# -- fakes for the injected faults ------------------------------------------------------------


class FakeServer(http.server.ThreadingHTTPServer):
    """Counts the requests it gets; never answers them (``hang``) or answers 503."""

    daemon_threads = True

    def __init__(self, mode: str) -> None:
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.mode = mode
        self.times: list[float] = []
        self.release = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    server: FakeServer

    def do_POST(self) -> None:
        self.server.times.append(time.monotonic())
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.server.mode == "hang":
            self.server.release.wait(60)
            return
        body = b'{"error": {"message": "Service Unavailable", "type": "x", "code": 503}}'
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    server = FakeServer(request.param)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


class Proxy:
    """A TCP proxy in front of the real vLLM server. With ``cut_after`` set, it forwards that
    many bytes of a response's body, then drops both connections (or, with ``stall``, sends
    nothing more until released); ``stop()`` closes its port (connection refused) and
    ``start()`` opens the same port again."""

    def __init__(self, upstream: str) -> None:
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1].split("/")[0]))
        self.cut_after: int | None = None
        self.cuts = 0
        self.stall = False
        self.release = threading.Event()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._listener: socket.socket | None = None

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() of the other thread
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
        cut, head, body = self.cut_after, b"", -1  # body: bytes of body sent, -1 in the head
        try:
            while data := upstream.recv(65536):
                if cut is None:
                    client.sendall(data)
                    continue
                if body < 0:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        client.sendall(data)
                        continue
                    rest = len(head) - (end + 4)  # body bytes at the end of this read
                    client.sendall(data[: len(data) - rest])
                    data, body = data[len(data) - rest :], 0
                client.sendall(data[: cut - body])
                body += min(len(data), cut - body)
                if body >= cut:
                    self.cuts += 1
                    if self.stall:
                        self.release.wait(60)
                    break
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass


@pytest.fixture
def proxy(vllm_server: str) -> Iterator[Proxy]:
    proxy = Proxy(vllm_server)
    proxy.start()
    yield proxy
    proxy.release.set()
    proxy.stop()


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment for ``rag-app`` in server mode, with reference/index.md ingested."""
    root = tmp_path_factory.mktemp("faults")
    docs = root / "docs" / "reference"
    docs.mkdir(parents=True)
    shutil.copy(CORPUS / "reference" / "index.md", docs / "index.md")
    env = {
        **os.environ,
        "RAG_APP_CONFIG": str(PROFILE),
        "RAG_APP_MILVUS__URI": str(root / "cli.db"),
        "RAG_APP_LLM__MODE": "server",
        "RAG_APP_LLM__MODEL": "smollm2",
        "RAG_APP_LLM__TOKENIZER": str(REPO / ".models" / "SmolLM2-135M-Instruct"),
        "RAG_APP_LLM__API_KEY": SECRET,
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the embedding model's "Loading weights" bar
    }
    ingest = run_cli(env, "ingest", str(root / "docs"))
    assert ingest.returncode == 0, ingest.stderr
    return env


def run_cli(env: dict[str, str], *args: str, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rag_app.cli", *args],
        env={**env, **overrides}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit status 2 and exactly one line on stderr; that line."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rag-app: error: ")
    assert SECRET not in result.stderr + result.stdout
    return lines[0].removeprefix("rag-app: error: ")


# -- server down --------------------------------------------------------------------------------


def test_server_down_fails_in_one_line_naming_the_url_and_the_fix(cli_env, tmp_path):
    url = closed_port_url()
    down = f"cannot reach the vLLM server at {url}: connection refused (after 3 tries; "
    down += "start it, or check llm.api_base)"
    result = run_cli(cli_env, "query", HNSW_QUESTION, RAG_APP_LLM__API_BASE=url)
    assert one_error_line(result) == down
    assert result.stdout == ""

    questions = tmp_path / "questions.txt"
    questions.write_text(f"{HNSW_QUESTION}\nWhat does efConstruction control?\n")
    batch = run_cli(cli_env, "query", "--file", str(questions), RAG_APP_LLM__API_BASE=url)
    assert one_error_line(batch) == down


def test_server_down_from_python_raises_rag_app_error_after_the_configured_retries():
    llm = build_llm(server_cfg(closed_port_url(), max_retries=0))
    with pytest.raises(RagAppError, match=r"connection refused \(after 1 try; start it"):
        llm.chat(MESSAGES)
    with pytest.raises(RagAppError, match=r"connection refused \(after 1 try; start it"):
        list(llm.stream_chat(MESSAGES))


# -- slow server --------------------------------------------------------------------------------


@pytest.mark.parametrize("fake_server", ["hang"], indirect=True)
def test_a_server_that_never_answers_is_retried_then_reported(fake_server):
    llm = build_llm(server_cfg(fake_server.url, request_timeout=1, max_retries=1))
    timeout = (
        f"the vLLM server at {fake_server.url} did not answer within 1 s (after 2 tries; "
        "raise llm.request_timeout, or check that the server is up and not overloaded)"
    )
    for call in (llm.chat, lambda m: list(llm.stream_chat(m))):  # a stream is retried too
        fake_server.times.clear()
        with pytest.raises(RagAppError) as caught:
            call(MESSAGES)
        assert str(caught.value) == timeout
        assert len(fake_server.times) == 2  # the first try and one retry
        # The retry came only after the first try's 1 s timeout ran out.
        assert fake_server.times[1] - fake_server.times[0] >= 1.0


@pytest.mark.parametrize("fake_server", ["hang"], indirect=True)
def test_cli_against_a_server_that_never_answers(cli_env, fake_server):
    result = run_cli(
        cli_env, "query", HNSW_QUESTION, RAG_APP_LLM__API_BASE=fake_server.url,
        RAG_APP_LLM__REQUEST_TIMEOUT="1", RAG_APP_LLM__MAX_RETRIES="1",
    )  # fmt: skip
    assert one_error_line(result) == (
        f"the vLLM server at {fake_server.url} did not answer within 1 s (after 2 tries; "
        "raise llm.request_timeout, or check that the server is up and not overloaded)"
    )
    assert len(fake_server.times) == 2


@pytest.mark.parametrize("fake_server", ["503"], indirect=True)
def test_a_server_answering_503_is_retried_then_reported(fake_server):
    llm = build_llm(server_cfg(fake_server.url, max_retries=1))
    with pytest.raises(RagAppError) as caught:
        llm.chat(MESSAGES)
    assert str(caught.value) == (
        f"the vLLM server at {fake_server.url} answered HTTP 503, after 2 tries: "
        "Service Unavailable (check the server log)"
    )
    assert len(fake_server.times) == 2


# -- the real server: a cut stream, a wrong model, and recovery ---------------------------------


@pytest.mark.server
def test_cli_stream_cut_by_the_server_prints_what_came_then_one_line_and_recovers(cli_env, proxy):
    proxy.cut_after = 1200  # the role chunk and a few tokens of the answer
    cut = run_cli(cli_env, "query", HNSW_QUESTION, "--stream", RAG_APP_LLM__API_BASE=proxy.url)
    error = one_error_line(cut)
    assert proxy.cuts == 1
    match = re.fullmatch(
        rf"the vLLM server at {re.escape(proxy.url)} closed the stream after (\d+) tokens: "
        r"peer closed connection without sending complete message body \(incomplete chunked "
        r"read\) \(the answer so far is incomplete; ask again once the server is back\)",
        error,
    )
    assert match and int(match[1]) >= 1, error
    assert cut.stdout.strip() and cut.stdout.endswith("\n")  # the tokens, the line ended
    assert "Sources:" not in cut.stdout

    proxy.cut_after = None  # the server is back
    whole = run_cli(cli_env, "query", HNSW_QUESTION, "--stream", RAG_APP_LLM__API_BASE=proxy.url)
    assert whole.returncode == 0, whole.stderr
    answer, _, sources = whole.stdout.partition("\nSources:\n")
    assert len(answer.strip()) > len(cut.stdout.strip())
    assert "[1] reference/index.md" in sources


@pytest.mark.server
def test_python_stream_cut_raises_rag_app_error_and_the_same_engine_recovers(
    session_cfg, session_index, proxy
):
    cfg = server_cfg(proxy.url, session_cfg.milvus.uri)
    engine = build_query_engine(cfg, index=session_index, streaming=True)
    proxy.cut_after = 1200
    tokens: list[str] = []
    response = engine.query(HNSW_QUESTION)
    with pytest.raises(RagAppError, match=r"closed the stream after \d+ tokens") as caught:
        for token in response.response_gen:  # type: ignore[union-attr]
            tokens.append(token)
    assert "".join(tokens).strip() and SECRET not in str(caught.value)

    proxy.cut_after = None
    response = engine.query(HNSW_QUESTION)
    answer = "".join(response.response_gen)  # type: ignore[union-attr]
    assert len(answer.strip()) > len("".join(tokens).strip())
    assert response.source_nodes[0].node.metadata["source"] == "reference/index.md"


@pytest.mark.server
def test_a_whole_answer_lost_in_transit_is_retried_then_reported(proxy):
    llm = build_llm(server_cfg(proxy.url, max_retries=1, max_tokens=8))
    proxy.cut_after = 100  # of a non-streamed answer: nothing was shown, so it is retried
    with pytest.raises(RagAppError) as caught:
        llm.chat(MESSAGES)
    assert proxy.cuts == 2
    assert re.fullmatch(
        rf"the vLLM server at {re.escape(proxy.url)} dropped the connection before answering: "
        r"peer closed connection without sending complete message body \(received 100 bytes, "
        r"expected \d+\) \(after 2 tries; check the server's log, and any proxy in front of it\)",
        str(caught.value),
    ), caught.value
    proxy.cut_after = None
    assert llm.chat(MESSAGES).message.content


@pytest.mark.server
def test_a_stream_that_stalls_is_reported_after_request_timeout(proxy):
    llm = build_llm(server_cfg(proxy.url, request_timeout=2))
    proxy.cut_after, proxy.stall = 1200, True
    deltas: list[str] = []
    started = time.monotonic()
    with pytest.raises(RagAppError) as caught:
        for chunk in llm.stream_chat(MESSAGES):
            deltas.append(chunk.delta or "")
    assert time.monotonic() - started >= 2.0  # given up only after the 2 s of silence
    tokens = sum(1 for d in deltas if d)
    assert tokens >= 1 and str(caught.value) == (
        f"the vLLM server at {proxy.url} sent nothing for 2 s after {tokens} tokens (the "
        "answer so far is incomplete; ask again, or raise llm.request_timeout)"
    )


@pytest.mark.server
def test_an_unknown_model_is_reported_with_the_servers_message_without_retrying(vllm_server):
    llm = build_llm(server_cfg(vllm_server, model="nope"))
    with pytest.raises(RagAppError) as caught:
        llm.chat(MESSAGES)
    message = str(caught.value)
    assert message.startswith(
        f"the vLLM server at {vllm_server} answered HTTP 404: The model `nope` does not exist."
    )
    assert message.endswith(
        "(check llm.model: the server's --served-model-name; and that llm.api_base ends in /v1)"
    )


@pytest.mark.server
def test_interactive_chat_reports_a_failed_turn_and_goes_on_when_the_server_is_back(cli_env, proxy):
    proxy.stop()  # the server is down: connection refused
    primary, secondary = pty.openpty()
    chat = subprocess.Popen(
        [sys.executable, "-m", "rag_app.cli", "chat", "--top-k", "2"],
        stdin=secondary, stdout=secondary, stderr=secondary,
        env={**cli_env, "RAG_APP_LLM__API_BASE": proxy.url, "RAG_APP_LLM__MAX_RETRIES": "0"},
    )  # fmt: skip
    os.close(secondary)
    seen = b""

    def until(marker: bytes, timeout: float = 300) -> str:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([primary], [], [], 1)[0]:
                seen += os.read(primary, 65536)
        text, _, rest = seen.partition(marker)
        seen = rest
        return text.decode(errors="replace").replace("\r\n", "\n")

    try:
        until(b"you> ")
        os.write(primary, f"{HNSW_QUESTION}\n".encode())
        failed = until(b"you> ")
        errors = [line for line in failed.splitlines() if line.startswith("rag-app: error:")]
        assert errors == [
            f"rag-app: error: cannot reach the vLLM server at {proxy.url}: connection refused "
            "(after 1 try; start it, or check llm.api_base)"
        ], failed
        assert "Traceback" not in failed and "Exception in thread" not in failed

        proxy.start()  # the server is back, on the same address
        os.write(primary, f"{HNSW_QUESTION}\n".encode())
        answered = until(b"you> ")
        assert "assistant> " in answered and "[1] reference/index.md" in answered, answered
        assert "rag-app: error" not in answered
        os.write(primary, b"/exit\n")
        assert chat.wait(timeout=60) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
            chat.wait()
        os.close(primary)


def test_the_api_key_never_appears_in_a_server_error():
    url = f"http://user:{SECRET}@127.0.0.1:{_free_port()}/v1"
    llm = build_llm(server_cfg(url, max_retries=0))
    with pytest.raises(RagAppError) as caught:
        llm.chat(MESSAGES)
    message = str(caught.value)  # the credentials left the URL for the key: neither shows
    assert SECRET not in message and "vLLM server at http://127.0.0.1:" in message


def test_max_retries_is_a_setting():
    assert load_config(PROFILE).llm.max_retries == 2
    assert build_llm(server_cfg(closed_port_url(), max_retries=5)).retries == 5
