"""int8 (ONNX Runtime) against bf16 (torch) forward passes, for MiniLM and a BGE-large shape.

    .venv/bin/python scripts/bench_int8.py [--batches 8] [--batch-size 32] [--tokens 128]

Uniform batches of ``--tokens``-token inputs (no padding, no tokenizing: the model alone),
one run, side by side:

1. the offline all-MiniLM-L6-v2: torch bf16 (what ``precision = "bf16"`` runs) against
   rag_app's int8 export of it (what ``precision = "int8"`` runs);
2. a model of BAAI/bge-large-en-v1.5's shape (BERT, 24 layers, hidden 1024, 16 heads),
   random weights: BGE weights cannot be had offline, and speed does not depend on the
   values of the weights;
3. where the int8 graph's time goes (ONNX Runtime's profiler, per operator type): the
   quantized matrix products against everything else (fp32 attention products, softmax,
   layer norms, GELU, the bias adds), which int8 cannot make faster.

The issue's target is int8 >= 1.6x bf16 chunks/s.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MINILM = REPO / ".models" / "all-MiniLM-L6-v2"
QUANTIZED_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                 "DynamicQuantizeLinear", "QAttention"}  # fmt: skip


def bge_large_shaped(folder: Path) -> Path:
    """A BERT of BGE-large's shape with random weights, MiniLM's (BERT) tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, vocab_size=30522)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):  # fmt: skip
        shutil.copy(MINILM / name, folder / name)
    return folder


def rate(run, batches: int, batch_size: int) -> float:
    run()  # warm-up: first-call allocations, oneDNN primitives
    started = time.perf_counter()
    for _ in range(batches):
        run()
    return batches * batch_size / (time.perf_counter() - started)


def measure(label: str, folder: Path, args: argparse.Namespace) -> tuple[float, float, str]:
    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from rag_app.components.embedding import import_torch
    from rag_app.components.embedding.onnx import ensure_onnx_model

    import_torch()
    ids = torch.randint(1000, 20000, (args.batch_size, args.tokens))
    mask = torch.ones_like(ids)
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16).eval()

    def bf16() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    bf16_rate = rate(bf16, args.batches, args.batch_size)
    path = ensure_onnx_model(folder, quantized=True)
    options = ort.SessionOptions()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
             "token_type_ids": np.zeros_like(ids.numpy())}  # fmt: skip
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    int8_rate = rate(lambda: session.run(None, feeds), args.batches, args.batch_size)

    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "bench-int8")
    profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        profiled.run(None, feeds)
    trace = Path(profiled.end_profiling())
    per_op: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(per_op.values()) or 1
    quantized = sum(v for k, v in per_op.items() if k in QUANTIZED_OPS) / total
    top = ", ".join(f"{k} {v / total:.0%}" for k, v in per_op.most_common(6))
    print(f"  {label}: bf16 {bf16_rate:.1f}, int8 {int8_rate:.1f} chunks/s", flush=True)
    return bf16_rate, int8_rate, f"int8 matrix products {quantized:.0%} of the int8 time; {top}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-large", action="store_true", help="MiniLM only")
    args = parser.parse_args()
    from rag_app.components.embedding.onnx import require_backend

    require_backend()
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as work:
        # MiniLM's int8 export is the one precision = "int8" uses (made beside it if missing).
        models = {"all-MiniLM-L6-v2": MINILM}
        if not args.no_large:
            models["BGE-large shape (random weights)"] = bge_large_shaped(Path(work) / "large")
        rows = {name: measure(name, folder, args) for name, folder in models.items()}
    print(f"\nbatches of {args.batch_size} x {args.tokens} tokens, {args.batches} batches\n")
    print("| model | bf16 chunks/s | int8 chunks/s | int8 / bf16 | target |")
    print("|---|---|---|---|---|")
    for name, (bf16, int8, _) in rows.items():
        print(f"| {name} | {bf16:.1f} | {int8:.1f} | {int8 / bf16:.2f}x | >= 1.6x |")
    print()
    for name, (_, _, profile) in rows.items():
        print(f"{name}: {profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
