"""Start or stop a Milvus server on this machine, without Docker, for several processes to share.

    .venv/bin/python scripts/milvus_server.py start [--data-dir DIR] [--port PORT]
    .venv/bin/python scripts/milvus_server.py status [--data-dir DIR]
    .venv/bin/python scripts/milvus_server.py stop [--data-dir DIR]

The server is Milvus Lite's own gRPC server (``milvus-lite server``, from the milvus-lite
package rag_app already installs): the Milvus API on a TCP port, the same engine as a Lite
file, but in a process of its own, so many processes can ingest and query at once (a Lite
file is locked by the one process that opens it). It listens on 127.0.0.1 only.

``start`` returns once the server answers and prints its ``uri`` (and nothing else on
stdout), so ``export RAG_APP_MILVUS__URI=$(... start)`` points rag_app at it. Its data
lives in ``DIR/data``, its log in ``DIR/server.log``, its pid and uri in ``DIR/server.json``.
``stop`` interrupts it (it drains requests and closes its data), kills it if it has not
exited within ``--timeout`` seconds, and leaves no process behind.

For a production Milvus standalone, a cluster or Zilliz Cloud see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path("data/milvus-server")
# The server process: milvus-lite's `server` command, with three changes. SIGINT is restored
# (a shell's background job starts with it ignored), so `stop` can shut it down gracefully.
# Its gRPC server accepts pymilvus's keepalive pings (one per 10 s, even when idle), as
# a Milvus server does; with gRPC's defaults it answers the third idle ping with GOAWAY
# "too_many_pings", and the client's next call on that connection can fail. And its BM25
# scores with the whole collection's statistics (rag_app/compat/milvus_lite.py, its path the
# first argument, loaded alone: the server needs none of rag_app's heavy imports).
COMPAT = Path(__file__).resolve().parent.parent / "rag_app" / "compat" / "milvus_lite.py"
SERVE = """
import importlib.util, signal, sys
import grpc
_spec = importlib.util.spec_from_file_location("rag_app_compat_milvus_lite", sys.argv.pop(1))
_compat = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compat)
_compat.install()
signal.signal(signal.SIGINT, signal.default_int_handler)
_grpc_server = grpc.server
def _server(*args, options=(), **kwargs):
    options = [*options, ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
               ("grpc.http2.max_ping_strikes", 0), ("grpc.keepalive_permit_without_calls", 1)]
    return _grpc_server(*args, options=options, **kwargs)
grpc.server = _server
from milvus_lite.cmdline import main
sys.exit(main())
"""


class ServerError(Exception):
    pass


def _state_file(data_dir: Path) -> Path:
    return data_dir / "server.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(uri: str) -> bool:
    from pymilvus import MilvusClient, MilvusException

    try:
        client = MilvusClient(uri=uri, timeout=2)
        client.list_collections(timeout=2)
        client.close()
        return True
    except (MilvusException, OSError):
        return False


def running(data_dir: Path) -> dict[str, object] | None:
    """The server's pid and uri, if one started for ``data_dir`` is still running."""
    try:
        state = json.loads(_state_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(int(state["pid"])) else None


def start(data_dir: Path, port: int = 0, workers: int = 32, timeout: float = 60) -> str:
    """Start the server for ``data_dir`` (or find it running) and return its uri."""
    data_dir = data_dir.resolve()
    if state := running(data_dir):
        return str(state["uri"])
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = data_dir / "server.log"
    command = [
        sys.executable, "-c", SERVE, str(COMPAT), "server", "--data-dir", str(data_dir / "data"),
        "--host", "127.0.0.1", "--port", str(port), "--max-workers", str(workers),
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script; not hit by the terminal's Ctrl-C
        )  # fmt: skip
    _state_file(data_dir).write_text(json.dumps({"pid": process.pid, "uri": uri}) + "\n")
    deadline = time.monotonic() + timeout
    while not _answers(uri):
        if process.poll() is not None:
            _state_file(data_dir).unlink(missing_ok=True)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise ServerError(f"the Milvus server exited at start: {tail[0]} (log: {log})")
        if time.monotonic() > deadline:
            stop(data_dir)
            raise ServerError(f"the Milvus server did not answer within {timeout:.0f} s ({log})")
        time.sleep(0.2)
    return uri


def stop(data_dir: Path, timeout: float = 15) -> bool:
    """Stop the server of ``data_dir``; False if none was running."""
    data_dir = data_dir.resolve()
    state = running(data_dir)
    _state = _state_file(data_dir)
    if state is None:
        _state.unlink(missing_ok=True)
        return False
    pid = int(state["pid"])  # type: ignore[call-overload]
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.1)
    _state.unlink(missing_ok=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    parser.add_argument("--port", type=int, default=19530, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=32, help="request threads")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            print(start(args.data_dir, args.port, args.workers, args.timeout), flush=True)
        elif args.command == "stop":
            if not stop(args.data_dir, args.timeout):
                print(f"no Milvus server running for {args.data_dir}", file=sys.stderr)
        elif state := running(args.data_dir):
            print(f"{state['uri']} (pid {state['pid']})")
        else:
            print(f"no Milvus server running for {args.data_dir}", file=sys.stderr)
            return 1
    except ServerError as exc:
        print(f"milvus_server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
