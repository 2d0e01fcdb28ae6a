"""SIGTERM to ``rag-app serve`` while it answers: it stops accepting connections, the
answer in flight completes, the process exits 0, and no process of it (the vLLM engine
core among them) is left behind."""

from __future__ import annotations

import signal
import time

import httpx

from tests.conftest import SERVE_KEYS, descendants, process_running


def test_sigterm_lets_the_answer_in_flight_finish_then_exits_0_leaving_no_process(rag_server):
    server = rag_server.ensure()
    process = server.process
    children = descendants(process.pid)
    assert children  # vLLM's engine core, at least
    body = {"messages": [{"role": "user", "content": "Explain all index types in detail"}],
            "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {SERVE_KEYS['full']}"}
    lines: list[str] = []
    signalled = False
    with httpx.Client(timeout=120) as http, http.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=headers
    ) as reply:  # fmt: skip
        for line in reply.iter_lines():
            lines.append(line)
            if not signalled and '"delta": {"content"' in line:
                process.send_signal(signal.SIGTERM)
                signalled = True
                _until_refused(server.url + "/healthz")  # no new connections, at once
    assert signalled and [line for line in lines if line][-1] == "data: [DONE]"
    assert any('"finish_reason": "stop"' in line and '"sources"' in line for line in lines)
    assert process.wait(timeout=120) == 0
    assert not _still_running(children), server.log()[-2000:]
    assert "Traceback" not in server.log()


def _still_running(pids: set[int], seconds: float = 30) -> list[str]:
    """The command lines of ``pids`` still running once ``seconds`` have passed (or none).

    Python's multiprocessing resource tracker exits when it sees its parent gone, a moment
    after the service: a process is left behind only if it outlives that moment.
    """
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if process_running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [_cmdline(pid) for pid in alive]


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return str(pid)


def _until_refused(url: str, seconds: float = 30) -> None:
    """Poll ``url`` until a connection is refused (the listening socket is closed).

    A request may still be answered in the moment before uvicorn sees the signal; one whose
    connection was made just before the socket closed is dropped unanswered (uvicorn closes
    idle connections as it shuts down) or reset (the kernel resets those not yet accepted):
    all are polled past. A request that hangs (a timeout) fails the test.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=2)
        except httpx.ConnectError:
            return
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            pass  # connected, then closed or reset unanswered
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
