"""Check that the CUDA install resolves, without installing it or needing a GPU.

    .venv/bin/python scripts/check_gpu_install.py [--python 3.11] [--glibc 2.35]

Resolves requirements/gpu.txt (vLLM for CUDA, rag_app's pinned stack and the dev tools: what
scripts/setup.sh installs on a CUDA machine, in one pip run) for Linux x86_64 and CPython
3.11, as pip would there: binary wheels only, against the package index alone (this
machine's pip configuration, its local wheels and caps, are left out). Prints the vLLM, torch
and transformers it resolves; on a conflict, exits 1 with pip's explanation.

pip reads each wheel's metadata (PEP 658 files, or byte ranges of the wheel where an index
serves none), so nothing near the size of the CUDA wheels is downloaded. That needs the pip
of requirements/pip.txt, which the check runs from a virtual environment of its own in
.cache/gpu-check/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements" / "gpu.txt"
PIP_PIN = REPO / "requirements" / "pip.txt"
WORK = REPO / ".cache" / "gpu-check"
SHOWN = ("vllm", "torch", "transformers")
# pip settings a CUDA machine would share with this one; the rest (config files, find-links,
# constraints, extra indexes) describe this machine only.
KEPT = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY",
        "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}  # fmt: skip


def _pinned_pip() -> str:
    for line in PIP_PIN.read_text().splitlines():
        if line.strip().startswith("pip=="):
            return line.strip()
    raise SystemExit(f"check_gpu_install: no pip== line in {PIP_PIN}")


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in KEPT}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _tool_python(env: dict[str, str]) -> Path:
    """A virtual environment holding the pinned pip (made once, kept in .cache/)."""
    python = WORK / "venv" / "bin" / "python"
    wanted = _pinned_pip().split("==", 1)[1]
    current = subprocess.run(
        [str(python), "-c", "import pip; print(pip.__version__)"],
        capture_output=True, text=True, env=env,
    ) if python.exists() else None  # fmt: skip
    if current is None or current.stdout.strip() != wanted:
        venv.create(WORK / "venv", with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-r", str(PIP_PIN)],
            check=True, env=env,
        )  # fmt: skip
    return python


def _platforms(glibc: str) -> list[str]:
    """The wheel tags a Linux x86_64 machine with this glibc accepts (pip expands only the
    legacy manylinux2014 tag itself)."""
    major, minor = (int(part) for part in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
            "linux_x86_64"]  # fmt: skip


def _explain(output: str) -> str:
    """pip's account of a conflict: its ERROR lines and the "conflict is caused by" block."""
    lines = output.splitlines()
    keep = [line for line in lines if line.startswith("ERROR:")]
    if "The conflict is caused by:" in lines:
        start = lines.index("The conflict is caused by:")
        block: list[str] = []
        for line in lines[start:]:
            if not line.strip() and block:
                break
            block.append(line)
        keep = [*block, *keep]
    return "\n".join(keep or lines[-20:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default="3.11", help="CPython version (default 3.11)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--glibc", default="2.35", help="glibc of the CUDA machine (default "
                        "2.35, Ubuntu 22.04's)")  # fmt: skip
    args = parser.parse_args(argv)
    env = _environment()
    python = _tool_python(env)
    report = WORK / "report.json"
    report.unlink(missing_ok=True)
    command = [
        str(python), "-m", "pip", "install", "--dry-run", "--ignore-installed",
        "--use-feature=fast-deps", "--only-binary=:all:", "--implementation", "cp",
        "--python-version", args.python, *(f"--platform={tag}" for tag in _platforms(args.glibc)),
        "--report", str(report), "-r", str(args.requirements),
    ]  # fmt: skip
    target = f"linux x86_64 (glibc {args.glibc}) / CPython {args.python}"
    started = time.monotonic()
    done = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        print(
            f"check_gpu_install: {args.requirements} does not resolve for "
            f"{target}:\n{_explain(done.stdout)}",
            file=sys.stderr,
        )
        return 1
    installed = json.loads(report.read_text())["install"]
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}
    missing = [name for name in SHOWN if name not in versions]
    if missing:
        print(f"check_gpu_install: the resolution has no {', '.join(missing)}", file=sys.stderr)
        return 1
    shown = ", ".join(f"{name} {versions[name]}" for name in SHOWN)
    print(f"GPU install resolves for {target}: {shown} ({len(versions)} packages, {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
