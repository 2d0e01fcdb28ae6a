"""Torch is loaded with passive OpenMP waiting (see ``import_torch``): spinning threads fight
Milvus Lite's threads in the same process, and a retrieve took 4x longer. The policy is set
for torch's load only, so child processes (vLLM's engine) keep their own, and a user's
choice wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys\n"
    "from rag_app.components.embedding import import_torch\n"
    "seen = []\n"
    "real_import = __builtins__.__import__\n"
    "def spy(name, *args, **kwargs):\n"
    "    if name == 'torch' and 'torch' not in sys.modules:\n"
    "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
    "    return real_import(name, *args, **kwargs)\n"
    "__builtins__.__import__ = spy\n"
    "import_torch()\n"
    "print(seen[0], os.environ.get('OMP_WAIT_POLICY'))\n"
)


def probe(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environment, **env},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[-2]


@pytest.mark.slow
def test_torch_loads_with_passive_waiting_and_the_environment_is_left_as_it_was():
    assert probe() == "PASSIVE None"


@pytest.mark.slow
def test_a_policy_the_user_set_is_kept():
    assert probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE ACTIVE"
