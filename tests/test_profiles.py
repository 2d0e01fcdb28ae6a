"""The documented profiles in configs/ load and hold what their docs say (no model loads:
configs/bge-m3.toml names hub models that are not available offline here)."""

from __future__ import annotations

from conftest import REPO

from rag_app.config import load_config

BGE_M3 = REPO / "configs" / "bge-m3.toml"


def test_the_bge_m3_profile_loads_with_the_cross_lingual_models():
    cfg = load_config(BGE_M3)
    assert cfg.embedding.model == "BAAI/bge-m3"
    assert cfg.embedding.query_instruction == ""  # bge-m3 has none; "" keeps BGE's out
    assert (cfg.chunking.splitter, cfg.chunking.chunk_size) == ("token", 512)
    assert cfg.chunking.chunk_overlap < cfg.chunking.chunk_size
    assert cfg.retrieval.rerank == "cross-encoder"
    assert cfg.retrieval.rerank_model == "BAAI/bge-reranker-v2-m3"
    assert cfg.retrieval.candidates > cfg.retrieval.top_k  # room for the reranker to choose
    assert cfg.llm.model == load_config(REPO / "config.toml").llm.model
    assert cfg.milvus.collection != load_config(REPO / "config.toml").milvus.collection
    # Its Lite file is the one config.toml uses (paths resolve from configs/).
    assert cfg.milvus.uri == load_config(REPO / "config.toml").milvus.uri
