"""Generation throughput: N concurrent questions through one vLLM engine vs one after another,
and Hugging Face Transformers ``generate`` on the same prompts, side by side, from one run.

    .venv/bin/python scripts/bench_generation.py [--corpus DIR] [--qa eval/dev.jsonl]

The grounded prompts (retrieval done beforehand, not timed) of the first 16 answerable
questions of the QA file go to SmolLM2-135M-Instruct in vLLM (configs/cpu-small.toml,
greedy, ``llm.max_tokens`` new tokens at most). All N questions arrive at once: "sequential"
answers them one after another, "concurrent" awaits ``acomplete`` for all of them at once
(the engine batches them continuously); a question's latency is the time from the start
until its answer is complete. The baseline is
Transformers ``generate`` (greedy, same model folder, same dtype, same token ids), one
question after another.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

from rag_app import (
    build_embed_model,
    build_index,
    build_llm,
    build_vector_store,
    ingest_path,
    load_config,
)
from rag_app.components.llm import AsyncEngineVllm
from rag_app.components.retrieval import build_retriever
from rag_app.pipelines.batch import grounded_prompt
from rag_app.pipelines.evaluate import load_qa

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    label: str
    n: int
    seconds: float
    tokens: int
    latencies: list[float]

    def row(self) -> str:
        p50 = statistics.median(self.latencies)
        p95 = sorted(self.latencies)[max(0, round(0.95 * len(self.latencies)) - 1)]
        rate = self.tokens / self.seconds
        return (
            f"{self.label:<24}{self.n:>4}{self.seconds:>9.1f}{self.tokens:>8}"
            f"{rate:>10.1f}{p50:>8.1f}{p95:>8.1f}"
        )


def vllm_sequential(llm: AsyncEngineVllm, prompts: list[str]) -> Run:
    started, latencies, tokens = time.perf_counter(), [], 0
    for prompt in prompts:
        reply = llm.complete(prompt, formatted=True)
        tokens += (reply.raw or {})["completion_tokens"]
        latencies.append(time.perf_counter() - started)
    return Run("vLLM, one at a time", len(prompts), latencies[-1], tokens, latencies)


def vllm_concurrent(llm: AsyncEngineVllm, prompts: list[str]) -> Run:
    async def ask(prompt: str, started: float) -> tuple[int, float]:
        reply = await llm.acomplete(prompt, formatted=True)
        return (reply.raw or {})["completion_tokens"], time.perf_counter() - started

    async def ask_all() -> list[tuple[int, float]]:
        started = time.perf_counter()
        return list(await asyncio.gather(*(ask(p, started) for p in prompts)))

    results = asyncio.run(ask_all())
    latencies = [seconds for _, seconds in results]
    tokens = sum(count for count, _ in results)
    return Run("vLLM, concurrent", len(prompts), max(latencies), tokens, latencies)


def transformers_sequential(model_dir: str, llm: AsyncEngineVllm, prompts: list[str]) -> Run:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    started, latencies, tokens = time.perf_counter(), [], 0
    for prompt in prompts:
        ids = torch.tensor([llm.token_ids(prompt)])
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=llm.max_new_tokens,
                do_sample=False,
                pad_token_id=llm.tokenizer.eos_token_id,
            )
        tokens += out.shape[1] - ids.shape[1]
        latencies.append(time.perf_counter() - started)
    return Run("Transformers generate", len(prompts), latencies[-1], tokens, latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus", type=Path, default=REPO.parent / "shared/corpora/milvus-docs/reference"
    )
    parser.add_argument("--config", type=Path, default=REPO / "configs/cpu-small.toml")
    parser.add_argument("--qa", type=Path, default=REPO / "eval/dev.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    uri = str(Path(tempfile.mkdtemp(prefix="bench-generation-")) / "milvus.db")
    cfg = load_config(args.config, milvus__uri=uri)
    embed_model = build_embed_model(cfg)
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, args.corpus, embed_model=embed_model, vector_store=store, progress=False)
    index = build_index(cfg, embed_model=embed_model, vector_store=store)
    questions = [item.question for item in load_qa(args.qa) if item.sources][:16]
    retriever = build_retriever(cfg, index)

    llm = build_llm(cfg)
    assert isinstance(llm, AsyncEngineVllm), "the benchmark needs llm.mode = 'local'"
    try:
        prompts = [grounded_prompt(llm, q, retriever.retrieve(q)) for q in questions]
        lengths = [len(llm.token_ids(p)) for p in prompts]
        print(
            f"{len(prompts)} grounded prompts, {min(lengths)}-{max(lengths)} tokens; "
            f"{llm.model}, at most {llm.max_new_tokens} new tokens, greedy",
            flush=True,
        )
        vllm_concurrent(llm, prompts[:2])  # warm-up
        runs = []
        for n in (1, 4, 16):
            runs += [vllm_sequential(llm, prompts[:n]), vllm_concurrent(llm, prompts[:n])]
            print(f"  N = {n} done", flush=True)
        runs.append(transformers_sequential(cfg.llm.model, llm, prompts))
    finally:
        llm.close()

    print(f"\n{'':<24}{'N':>4}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}")
    for run in runs:
        print(run.row())
    by = {(r.label, r.n): r for r in runs}
    for n in (4, 16):
        concurrent = by[("vLLM, concurrent", n)]
        sequential = by[("vLLM, one at a time", n)]
        speedup = (concurrent.tokens / concurrent.seconds) / (
            sequential.tokens / sequential.seconds
        )
        print(f"N = {n}: concurrent tokens/s = {speedup:.1f}x one at a time")
    hf = by[("Transformers generate", 16)]
    concurrent16 = by[("vLLM, concurrent", 16)]
    ratio = (concurrent16.tokens / concurrent16.seconds) / (hf.tokens / hf.seconds)
    print(f"N = 16: vLLM concurrent tokens/s = {ratio:.1f}x Transformers generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
