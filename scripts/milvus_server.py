"""Start or stop a Milvus server on this machine, without Docker, for several processes to share.

    .venv/bin/python scripts/milvus_server.py start [--kind standalone] [--data-dir DIR] [--port N]
    .venv/bin/python scripts/milvus_server.py status [--data-dir DIR]
    .venv/bin/python scripts/milvus_server.py stop [--data-dir DIR]

Two kinds of server, both listening on 127.0.0.1 only:

``lite`` (the default) is Milvus Lite's own gRPC server (``milvus-lite server``, from the
milvus-lite package rag_app already installs): the Milvus API on a TCP port, the same engine
as a Lite file, in a process of its own, so many processes can ingest and query at once (a
Lite file is locked by the one process that opens it).

``standalone`` is a real Milvus 2.3 standalone (the binary in the PyPI package ``milvus``,
requirements/dev.txt, with embedded etcd and local storage): real segments, index builds,
consistency levels, collections released at restart. It has no sparse vectors, so collections
need ``milvus.bm25 = false`` and ``retrieval.mode = "dense"``. Milvus 2.3 listens on every
interface and cannot be told otherwise, so it runs in a network namespace of its own that holds
only a loopback interface (reachable from nowhere), and this script forwards 127.0.0.1:PORT to
it. That needs root or unprivileged user namespaces (``unshare -rn true`` tells).

``start`` returns once the server answers and prints its ``uri`` (and nothing else on
stdout), so ``export RAG_APP_MILVUS__URI=$(... start)`` points rag_app at it. Its data
lives in ``DIR/data`` (``DIR/standalone`` for a standalone), its log in ``DIR/server.log``, its
pid, kind and uri in ``DIR/server.json``. ``stop`` interrupts it (it drains requests and closes
its data), kills its whole process group if it has not exited within ``--timeout`` seconds, and
leaves no process behind. ``serve --kind standalone`` runs a standalone in the foreground.

For a production Milvus standalone, a cluster or Zilliz Cloud see docs/scaling.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType

DEFAULT_DIR = Path("data/milvus-server")
KINDS = ("lite", "standalone")
# The server process: milvus-lite's `server` command, with three changes. SIGINT is restored
# (a shell's background job starts with it ignored), so `stop` can shut it down gracefully.
# Its gRPC server accepts pymilvus's keepalive pings (one per 10 s, even when idle), as
# a Milvus server does; with gRPC's defaults it answers the third idle ping with GOAWAY
# "too_many_pings", and the client's next call on that connection can fail. And its BM25
# scores with the whole collection's statistics, and NumPy's BLAS runs on one thread
# (rag_app/compat/milvus_lite.py, its path the first argument, loaded alone: the server needs
# none of rag_app's heavy imports).
COMPAT = Path(__file__).resolve().parent.parent / "rag_app" / "compat" / "milvus_lite.py"
SERVE = """
import importlib.util, signal, sys
import grpc
_spec = importlib.util.spec_from_file_location("rag_app_compat_milvus_lite", sys.argv.pop(1))
_compat = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compat)
_compat.install()
_compat.one_blas_thread()
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


def _state(pid: int) -> str | None:
    """The process's state letter (R, S, Z ...), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    return _state(pid) not in (None, "Z")


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``: a server and every child it started."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


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
    """The server's pid, kind and uri, if one started for ``data_dir`` is still running."""
    try:
        state = json.loads(_state_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    state.setdefault("kind", "lite")
    return state if _alive(int(state["pid"])) else None


def _command(kind: str, data_dir: Path, port: int, workers: int) -> list[str]:
    if kind == "lite":
        return [
            sys.executable, "-c", SERVE, str(COMPAT), "server",
            "--data-dir", str(data_dir / "data"), "--host", "127.0.0.1", "--port", str(port),
            "--max-workers", str(workers),
        ]  # fmt: skip
    _standalone_package()  # fail here, in one line, rather than in the server's log
    return [sys.executable, str(Path(__file__).resolve()), "serve", "--kind", "standalone",
            "--data-dir", str(data_dir), "--port", str(port)]  # fmt: skip


def start(
    data_dir: Path, port: int = 0, workers: int = 32, timeout: float = 120, kind: str = "lite"
) -> str:
    """Start the server for ``data_dir`` (or find it running) and return its uri."""
    data_dir = data_dir.resolve()
    if state := running(data_dir):
        if state["kind"] != kind:
            raise ServerError(
                f"a {state['kind']} server is already running for {data_dir}: stop it first "
                "or use another --data-dir"
            )
        return str(state["uri"])
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = data_dir / "server.log"
    command = _command(kind, data_dir, port, workers)
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this script; not hit by the terminal's Ctrl-C
        )  # fmt: skip
    state_json = {"pid": process.pid, "kind": kind, "uri": uri}
    _state_file(data_dir).write_text(json.dumps(state_json) + "\n")
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


def stop(data_dir: Path, timeout: float = 30) -> bool:
    """Stop the server of ``data_dir`` and every process it started; False if none ran.

    It is interrupted first (SIGINT: it drains requests and closes its data); whatever of its
    process group is left after ``timeout`` seconds is killed. A group whose leader died
    (a crashed relay, say) is killed too."""
    data_dir = data_dir.resolve()
    _state = _state_file(data_dir)
    try:
        pid = int(json.loads(_state.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
    if not group_members(pid):
        _state.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_members(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while group_members(pid):
            if time.monotonic() > deadline:
                raise ServerError(f"processes {group_members(pid)} survived SIGKILL")
            time.sleep(0.1)
    _state.unlink(missing_ok=True)
    return True


# --- the standalone: a real Milvus in a network namespace of its own ---------------------

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _standalone_package() -> ModuleType:
    try:
        import milvus  # the PyPI package `milvus`: a Milvus standalone binary and its launcher
    except ImportError:
        raise ServerError(
            "--kind standalone needs the `milvus` package: pip install -r requirements/dev.txt"
        ) from None
    return milvus


def _private_network() -> None:
    """Move this process into a new network namespace whose only interface is loopback.

    A socket keeps the namespace it was opened in, so one opened before still listens on the
    host's 127.0.0.1, while whatever listens after is reachable from this namespace only.
    Needs root, or unprivileged user namespaces (a user namespace is made for them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    user = os.geteuid() != 0
    if libc.unshare(CLONE_NEWNET | (CLONE_NEWUSER if user else 0)) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise ServerError(
            f"cannot make a private network namespace for the standalone ({reason}): run it "
            "as root, or allow user namespaces (sysctl kernel.unprivileged_userns_clone=1)"
        )
    if user:  # keep this user's uid and gid inside, so the files it writes are its own
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    with socket.socket() as sock:  # a new namespace's loopback starts down
        flags = struct.unpack(
            "16sh22x", fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0))
        )[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def _pump(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def _forward(listener: socket.socket, port: int) -> None:
    """Relay each connection to ``listener`` to 127.0.0.1:``port`` of this namespace."""
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            client.close()
            continue
        server.settimeout(None)
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _binaries_cache(milvus: ModuleType) -> Path:
    """Where the package's binaries are unpacked (250 MB), once for every data dir."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rag_app" / f"milvus-{milvus.__version__}"


def serve_standalone(data_dir: Path, port: int, stop_timeout: float = 10) -> int:
    """Run a Milvus standalone for ``data_dir`` in the foreground, on 127.0.0.1:``port``,
    until interrupted (SIGINT or SIGTERM); then stop it, killing it after ``stop_timeout``."""
    milvus = _standalone_package()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        listener = socket.create_server(("127.0.0.1", port))  # in the host's namespace
    except OSError as exc:
        raise ServerError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    _private_network()
    home = data_dir.resolve() / "standalone"
    cache = _binaries_cache(milvus)
    cache.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "bin").exists():
        (home / "bin").symlink_to(cache, target_is_directory=True)
    # A stopping query node waits for its segments to move to another node, for 30 s by
    # default: a standalone has none. Milvus reads settings from the environment too.
    os.environ["QUERYNODE_GRACEFULSTOPTIMEOUT"] = "1"
    config = milvus.MilvusServerConfig(data_dir=str(home))
    config.set("log.level", "warn")
    server = milvus.MilvusServer(config, wait_for_started=False)
    try:
        with (cache.parent / f"{cache.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process unpacks the binaries at a time
            server.start()
        process: subprocess.Popen[bytes] = server.server_proc
        health = f"http://127.0.0.1:{server.webservice_port}/healthz"
        while process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as reply:
                if b"OK" in reply.read():
                    break
            time.sleep(0.2)
        else:
            print(f"Milvus exited at start with {process.returncode} (logs: {home}/logs)")
            return 1
        print(
            f"Milvus {milvus.__version__} ready on 127.0.0.1:{port} (logs: {home}/logs)", flush=True
        )
        threading.Thread(target=_forward, args=(listener, server.listen_port), daemon=True).start()
        code = process.wait()
        print(f"Milvus exited with {code} (logs: {home}/logs)", flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_child(server.server_proc, stop_timeout)
        server.stop()  # closes its log files


def _stop_child(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # Milvus stops gracefully on SIGINT; SIGTERM hangs
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "serve"])
    parser.add_argument("--kind", choices=KINDS, default="lite", help="default lite")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR, help=f"default {DEFAULT_DIR}")
    parser.add_argument("--port", type=int, default=19530, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=32, help="request threads (lite)")
    parser.add_argument("--timeout", type=float, help="seconds to wait (start 120, stop 30)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            uri = start(args.data_dir, args.port, args.workers, args.timeout or 120, args.kind)
            print(uri, flush=True)
        elif args.command == "serve":
            if args.kind != "standalone":
                raise ServerError("serve runs a standalone: add --kind standalone")
            return serve_standalone(args.data_dir, args.port)
        elif args.command == "stop":
            if not stop(args.data_dir, args.timeout or 30):
                print(f"no Milvus server running for {args.data_dir}", file=sys.stderr)
        elif state := running(args.data_dir):
            print(f"{state['uri']} (pid {state['pid']}, {state['kind']})")
        else:
            print(f"no Milvus server running for {args.data_dir}", file=sys.stderr)
            return 1
    except ServerError as exc:
        print(f"milvus_server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
