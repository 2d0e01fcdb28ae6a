"""Load on ``rag-app serve``: concurrent HTTP clients streaming answers.

    .venv/bin/python scripts/bench_serve.py [--seconds 60] [--clients 1,4,16,32] [--url URL]

Without ``--url`` it ingests ``--corpus`` with ``rag-app ingest`` into a Milvus Lite file under
.cache/bench-serve/ (unchanged documents are not embedded again) and starts ``rag-app serve``
on it with the configured profile (SmolLM2 in vLLM, in-process, on a CPU), admitting 64
answers at once, and stops it at the end. Then, from one run: for each client count, that
many clients for ``--seconds``, each streaming an answer to the next question of ``--qa``
(round-robin) as soon as its previous one is complete; one client is the questions answered
one at a time through the same server, the baseline. Prints answers/s (and its ratio to one
at a time), time to first token and total latency p50/p95, and errors; then the wall time of
``rag-app query --server`` (a new process: Python start-up, the client, one answer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-serve"


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _answer(http, url: str, key: str, question: str, tally: Tally, until: float) -> None:
    """One streamed answer, timed; counted only if it finished within the window."""
    import httpx

    body = {"messages": [{"role": "user", "content": question}], "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    began = time.perf_counter()
    first = None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                               headers=headers) as reply:  # fmt: skip
            if reply.status_code != 200:
                await reply.aread()
                tally.errors.append(f"{reply.status_code}: {reply.text[:120]}")
                return
            async for line in reply.aiter_lines():
                if line.startswith('data: {"error"'):
                    tally.errors.append(line[6:160])
                    return
                if first is None and '"delta": {"content"' in line:
                    first = time.perf_counter() - began
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}"[:160])
        return
    if time.perf_counter() <= until:
        tally.total.append(time.perf_counter() - began)
        tally.ttft.append(first if first is not None else tally.total[-1])


async def run_load(url: str, key: str, questions: list[str], clients: int, seconds: float) -> Tally:
    import httpx

    tally = Tally()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await _answer(http, url, key, questions[0], Tally(), float("inf"))  # warm
        until = time.perf_counter() + seconds

        async def client(offset: int) -> None:
            n = offset
            while time.perf_counter() < until:
                await _answer(http, url, key, questions[n % len(questions)], tally, until)
                n += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] if ordered else 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"rag-app serve exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"rag-app serve not ready in 600 s:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--url", help="a running rag-app serve (default: start one)")
    parser.add_argument("--key", default=os.environ.get("RAG_APP_CLIENT__API_KEY", ""),
                        help="its API key (default: $RAG_APP_CLIENT__API_KEY)")  # fmt: skip
    parser.add_argument(
        "--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs/reference"
    )
    parser.add_argument("--qa", type=Path, default=REPO / "eval/milvus-docs/dev.jsonl")
    parser.add_argument("--clients", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=60, help="per client count")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    questions = [json.loads(line)["question"] for line in args.qa.read_text().splitlines()]
    env = {**os.environ, "RAG_APP_CONFIG": str(args.config), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    cli = [sys.executable, "-m", "rag_app.cli"]
    process = None
    url = args.url
    if url is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        env["RAG_APP_MILVUS__URI"] = str(CACHE / "milvus.db")
        ingest = subprocess.run([*cli, "ingest", str(args.corpus), "--no-progress"], env=env,
                                capture_output=True, text=True)  # fmt: skip
        if ingest.returncode != 0:
            raise SystemExit(ingest.stderr)
        print(ingest.stdout.strip(), flush=True)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "serve.log"
        serve_env = {
            **env,
            "RAG_APP_SERVER__MAX_CONCURRENT": "64",
            "RAG_APP_SERVER__MAX_QUEUE": "64",
            "RAG_APP_SERVER__ACCESS_LOG": "false",
        }
        with log.open("w") as out:  # fmt: skip
            process = subprocess.Popen([*cli, "serve", "--port", str(port)], env=serve_env,
                                       stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        started = time.perf_counter()
        _wait_ready(url, process, log)
        print(f"rag-app serve ready in {time.perf_counter() - started:.0f} s at {url}")
    try:
        print(f"{len(questions)} questions from {args.qa.name}, streamed; {args.seconds:.0f} s "
              "per row\n", flush=True)  # fmt: skip
        print(f"{'clients':>8}{'answers':>9}{'ans/s':>8}{'vs 1':>7}{'TTFT p50':>10}"
              f"{'p95':>7}{'total p50':>11}{'p95':>7}{'errors':>8}", flush=True)  # fmt: skip
        baseline = None
        for clients in counts:
            tally = asyncio.run(run_load(url, args.key, questions, clients, args.seconds))
            rate = len(tally.total) / args.seconds
            baseline = baseline or (rate if clients == counts[0] else None)
            ratio = f"{rate / baseline:.1f}x" if baseline else "-"
            row = (f"{clients:>8}{len(tally.total):>9}{rate:>8.2f}{ratio:>7}"
                   f"{_pct(tally.ttft, 0.5):>9.2f}s{_pct(tally.ttft, 0.95):>6.2f}s"
                   f"{_pct(tally.total, 0.5):>10.2f}s{_pct(tally.total, 0.95):>6.2f}s"
                   f"{len(tally.errors):>8}")  # fmt: skip
            if tally.errors:
                row += f"   first error: {tally.errors[0]}"
            print(row, flush=True)
        walls = []
        client_env = {**env, "RAG_APP_CLIENT__API_KEY": args.key}
        for question in questions[:3]:
            began = time.perf_counter()
            done = subprocess.run([*cli, "query", "--server", url, question], env=client_env,
                                  capture_output=True, text=True)  # fmt: skip
            walls.append(time.perf_counter() - began)
            if done.returncode != 0:
                print(f"rag-app query --server failed: {done.stderr.strip()}")
        print(f"\nrag-app query --server: wall time median {statistics.median(walls):.2f} s "
              f"of {len(walls)} (each a new process)")  # fmt: skip
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
