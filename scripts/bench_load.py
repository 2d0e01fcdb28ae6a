"""Load on a shared Milvus server: many client processes retrieving at once.

    .venv/bin/python scripts/bench_load.py [--clients 32] [--seconds 60] [--uri URI]

Without ``--uri`` it starts a Milvus server with scripts/milvus_server.py (in a temporary
folder, stopped at the end) and ingests ``--corpus`` into it. Then, from one run: one client
for ``--baseline-seconds``, and ``--clients`` clients (threads spread over ``--processes``
processes, each with its own embedding model, as separate applications would be) for
``--seconds``, all asking the questions of ``--qa`` round-robin through rag_app's retriever
(the configured query embedding, hybrid search in Milvus and the postprocessors; no LLM, whose
throughput scripts/bench_generation.py measures). Prints queries/s, p50/p95/p99 latency and
errors side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "scripts" / "milvus_server.py"


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _client_process(
    config: str, uri: str, questions: list[str], threads: int, start_at: float, seconds: float
) -> Tally:
    """One application: its own retriever, ``threads`` clients sharing it."""
    import torch

    from rag_app import build_index, build_retriever, load_config
    from rag_app.errors import first_line

    torch.set_num_threads(1)
    cfg = load_config(config, milvus__uri=uri)
    retriever = build_retriever(cfg, build_index(cfg))
    tally, lock = Tally(), threading.Lock()

    def client(offset: int) -> None:
        n = offset
        while time.time() < start_at:
            time.sleep(0.01)
        while time.time() < start_at + seconds:
            began = time.perf_counter()
            try:
                retriever.retrieve(questions[n % len(questions)])
                with lock:
                    tally.latencies.append(time.perf_counter() - began)
            except Exception as exc:  # counted and reported, the load goes on
                with lock:
                    tally.errors.append(first_line(exc))
            n += threads

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return tally


def run_load(args: argparse.Namespace, uri: str, questions: list[str], clients: int) -> str:
    processes = min(args.processes, clients)
    per_process = [clients // processes + (i < clients % processes) for i in range(processes)]
    seconds = args.seconds if clients > 1 else args.baseline_seconds
    start_at = time.time() + 45  # time for every process to load its model first
    with mp.get_context("spawn").Pool(processes) as pool:
        results = [
            pool.apply_async(
                _client_process,
                (str(args.config), uri, questions[i::processes], threads, start_at, seconds),
            )
            for i, threads in enumerate(per_process)
        ]
        tallies = [result.get() for result in results]
    latencies = sorted(x for t in tallies for x in t.latencies)
    errors = [e for t in tallies for e in t.errors]

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, round(p * len(latencies)))] * 1000 if latencies else 0
        )

    row = (
        f"{clients:>8}{len(latencies):>9}{len(latencies) / seconds:>10.1f}"
        f"{pct(0.50):>9.0f}{pct(0.95):>9.0f}{pct(0.99):>9.0f}{len(errors):>8}"
    )
    if errors:
        row += f"   first error: {errors[0]}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--uri", help="an existing Milvus server (default: start one)")
    parser.add_argument(
        "--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs/reference"
    )
    parser.add_argument("--qa", type=Path, default=REPO / "eval/milvus-docs/dev.jsonl")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--baseline-seconds", type=float, default=20)
    args = parser.parse_args()

    from rag_app import ingest_path, load_config
    from rag_app.pipelines.evaluate import load_qa

    questions = [item.question for item in load_qa(args.qa)]
    data_dir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    uri = args.uri
    if uri is None:
        uri = subprocess.run(
            [sys.executable, str(SERVER), "start", "--data-dir", str(data_dir), "--port", "0"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    try:
        cfg = load_config(args.config, milvus__uri=uri)
        report = ingest_path(cfg, args.corpus, progress=False)
        print(f"Milvus server {uri}: {report.summary()}", flush=True)
        print(
            f"retrieval: {cfg.retrieval.mode} search, top {cfg.retrieval.top_k} of "
            f"{cfg.retrieval.candidates}, {cfg.embedding.model}; {len(questions)} questions",
            flush=True,
        )
        print(f"\n{'clients':>8}{'queries':>9}{'q/s':>10}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'p99 ms':>9}{'errors':>8}", flush=True)  # fmt: skip
        for clients in (1, args.clients):
            print(run_load(args, uri, questions, clients), flush=True)
    finally:
        if args.uri is None:
            subprocess.run([sys.executable, str(SERVER), "stop", "--data-dir", str(data_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
