"""Fixes found in review of issue 11 (slow tier: MiniLM and Milvus Lite): an empty query
instruction is none, the relevance gate embeds with the model it is given, and a prefix
filter matches by prefix, not by substring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rag_app import build_index, build_retriever, build_vector_store, ingest_path
from rag_app.components.retrieval import RelevanceGate, parse_filters

pytestmark = pytest.mark.slow
BGE_PROMPT = "Represent this sentence for searching relevant passages: "


def test_an_empty_query_instruction_is_no_instruction_even_where_a_default_exists(embed_model):
    """HuggingFaceEmbedding gives BGE model ids BGE's prompt when the instruction is falsy;
    here MiniLM is given that prompt the same way, and "" must still mean none."""
    assert embed_model.query_instruction == ""
    prompts = embed_model._model.prompts  # the prompts HuggingFaceEmbedding built
    saved = dict(prompts)
    prompts["query"] = BGE_PROMPT
    try:
        question = "What do the parameters for HNSW mean?"
        query = np.array(embed_model.get_query_embedding(question))
        text = np.array(embed_model.get_text_embedding(question))
        prefixed = np.array(embed_model.get_text_embedding(BGE_PROMPT + question))
        assert float(query @ text) > 0.9999
        assert float(query @ prefixed) < 0.99  # the prompt would have changed the vector
    finally:
        prompts.clear()
        prompts.update(saved)


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_the_relevance_gate_embeds_with_the_model_it_is_given(small_cfg, embed_model, tmp_path):
    write(tmp_path / "docs", {"a.md": "# HNSW\n\nHNSW parameters are M and efConstruction.\n"})
    store = build_vector_store(small_cfg, embed_model)
    ingest_path(small_cfg, tmp_path / "docs", embed_model=embed_model, vector_store=store)
    small_cfg.retrieval.mode = "sparse"  # no dense search: the gate embeds the question itself
    index = build_index(small_cfg, embed_model=embed_model, vector_store=store)
    for threshold, expected in ((0.2, 1), (0.99, 0)):
        small_cfg.retrieval.abstain_below = threshold
        retriever = build_retriever(small_cfg, index, embed_model=embed_model)
        gate = next(s for s in retriever.postprocessors if isinstance(s, RelevanceGate))
        assert gate.embed_model is embed_model and gate.store is store
        assert len(retriever.retrieve("HNSW parameters")) == expected


def test_a_prefix_filter_matches_by_prefix_not_by_substring(small_cfg, embed_model, tmp_path):
    """source=guide/* renders as a TEXT_MATCH filter: it must match guide/a.md and not
    old/guide/a.md, which a substring (LIKE "%guide/%") match would."""
    text = "Partitions split a collection into parts.\n"
    write(tmp_path / "docs", {"guide/a.md": text, "old/guide/a.md": text, "guides.md": text})
    store = build_vector_store(small_cfg, embed_model)
    ingest_path(small_cfg, tmp_path / "docs", embed_model=embed_model, vector_store=store)
    index = build_index(small_cfg, embed_model=embed_model, vector_store=store)
    for mode in ("dense", "sparse", "hybrid"):
        small_cfg.retrieval.mode = mode
        retriever = build_retriever(
            small_cfg, index, top_k=10, filters=parse_filters(["source=guide/*"])
        )
        assert {h.node.metadata["source"] for h in retriever.retrieve("partitions")} == {
            "guide/a.md"
        }, mode
