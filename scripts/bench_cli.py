"""What the CLI costs to run: wall time and peak memory of whole processes, from one run.

    .venv/bin/python scripts/bench_cli.py [--corpus DIR] [--suite]

Each row is one process measured with GNU ``time -v`` (wall seconds, maximum resident set
size): ``rag-app --help``; ``rag-app collections``; a first ``rag-app ingest`` of the corpus
(the Milvus documentation by default) into a fresh Milvus Lite file; the same ingest again,
with nothing changed. Baselines beside them: a bare interpreter, and the interpreter
importing torch and transformers (what ``--help`` paid before imports became lazy).
``--suite`` also times the test tiers (scripts/test.sh fast, then slow: tens of minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def measure(label: str, command: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run ``command`` under GNU time; (label, wall seconds, max RSS in MB)."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], env=env, cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert wall and rss, done.stderr[-2000:]
    hours, minutes, seconds = int(wall.group(1) or 0), int(wall.group(2)), float(wall.group(3))
    return label, hours * 3600 + minutes * 60 + seconds, int(rss.group(1)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs")
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--suite", action="store_true", help="also time the test tiers")
    args = parser.parse_args()

    store = Path(tempfile.mkdtemp(prefix="bench-cli-")) / "milvus.db"
    env = {
        **os.environ,
        "RAG_APP_CONFIG": str(args.config),
        "RAG_APP_MILVUS__URI": str(store),
        "HF_HUB_OFFLINE": "1",
    }
    python, rag_app = str(VENV_BIN / "python"), str(VENV_BIN / "rag-app")
    ingest = [rag_app, "ingest", str(args.corpus), "--no-progress"]
    rows = [
        measure("python -c pass (baseline)", [python, "-c", "pass"], env),
        measure("import torch, transformers", [python, "-c", "import torch, transformers"], env),
        measure("rag-app --help", [rag_app, "--help"], env),
        measure("rag-app ingest (first)", ingest, env),
        measure("rag-app collections", [rag_app, "collections"], env),
        measure("rag-app ingest (unchanged)", ingest, env),
    ]
    if args.suite:
        for tier in ("fast", "slow"):
            test = ["bash", str(REPO / "scripts/test.sh"), tier, "-q", "-p", "no:cacheprovider"]
            rows.append(measure(f"scripts/test.sh {tier}", test, env))

    print(f"\n{'process':<30}{'wall s':>9}{'max RSS MB':>12}")
    for label, wall, rss in rows:
        print(f"{label:<30}{wall:>9.2f}{rss:>12.0f}")
    by = {label: (wall, rss) for label, wall, rss in rows}
    first, again = by["rag-app ingest (first)"][0], by["rag-app ingest (unchanged)"][0]
    print(f"\nunchanged re-ingest = {again / first:.1%} of the first ingest's wall time")
    help_wall = by["rag-app --help"][0]
    torch_wall = by["import torch, transformers"][0]
    print(f"rag-app --help = {help_wall / torch_wall:.2f}x importing torch and transformers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
