"""``embedding.query_runtime``: fp32/bf16 models embed questions through the model's own fp32
ONNX graph in ONNX Runtime on CPU (~3 ms where torch takes ~13-20 ms for one question here),
with vectors those of the model; the export is made at the first question, never by an
ingest; where it cannot be had, "auto" falls back to torch and "onnx" says why in one line.

Each test runs on a copy of the MiniLM folder, so its export is made fresh (slow tier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import HNSW_QUESTION, MINILM, PROFILE, model_copy

from rag_app import RagAppError, load_config
from rag_app.config import RagConfig

QUESTIONS = [
    HNSW_QUESTION,
    "How do I choose an index for vectors on disk?",
    "What does the consistency level control?",
    "milvus",
]
BGE_PROMPT = "Represent this sentence for searching relevant passages: "


def _cfg(model: Path, **embedding: object) -> RagConfig:
    cfg = load_config(PROFILE)
    data = cfg.model_dump()
    data["embedding"].update(model=str(model), **embedding)
    return RagConfig.model_validate(data)


def _unit(vectors: list[list[float]]) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float64)


# --- fast: what is decided before any model loads ----------------------------------------


def test_the_default_query_runtime_is_auto():
    assert load_config(PROFILE).embedding.query_runtime == "auto"


def test_onnx_queries_on_a_gpu_device_are_refused_in_one_line():
    from rag_app.components.embedding import build_embed_model

    with pytest.raises(RagAppError) as caught:
        build_embed_model(_cfg(MINILM, query_runtime="onnx", device="cuda"))
    message = str(caught.value)
    assert "CPU only" in message and 'query_runtime = "auto" or "torch"' in message
    assert "\n" not in message


def test_auto_on_a_gpu_device_leaves_queries_to_torch():
    from rag_app.components.embedding import _query_encoder_settings

    assert _query_encoder_settings(_cfg(MINILM, device="cuda")) is None
    assert _query_encoder_settings(_cfg(MINILM, query_runtime="torch")) is None
    chosen = _query_encoder_settings(_cfg(MINILM, device="cpu"))
    assert chosen == {"model_dir": MINILM, "required": False}


def test_onnx_queries_without_onnxruntime_name_the_package(monkeypatch):
    import sys

    from rag_app.components.embedding import _query_encoder_settings

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the fault: not installed
    with pytest.raises(RagAppError) as caught:
        _query_encoder_settings(_cfg(MINILM, query_runtime="onnx", device="cpu"))
    assert "needs the onnxruntime package" in str(caught.value)


# --- slow: the real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_copy(tmp_path_factory.mktemp("queries") / "all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def torch_model(folder: Path):
    from rag_app.components.embedding import build_embed_model

    return build_embed_model(_cfg(folder, query_runtime="torch", precision="fp32"))


@pytest.mark.slow
def test_texts_never_export_and_the_first_question_does(folder, caplog):
    from rag_app.components.embedding import build_embed_model
    from rag_app.components.embedding.onnx import FP32_FILE

    model = build_embed_model(_cfg(folder, device="cpu"))
    model.get_text_embedding_batch(["HNSW builds a graph.", "Partitions split data."])
    assert not (folder / "onnx" / FP32_FILE).exists()  # an ingest embeds no question
    assert model.query_runtime == "torch"
    with caplog.at_level("INFO"):
        model.get_query_embedding(HNSW_QUESTION)
    assert (folder / "onnx" / FP32_FILE).is_file() and model.query_runtime == "onnx"
    assert "exporting" in caplog.text and "fp32 ONNX" in caplog.text
    assert not [p for p in (folder / "onnx").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_onnx_query_vectors_are_the_models_own(folder, torch_model, precision):
    from rag_app.components.embedding import build_embed_model

    model = build_embed_model(_cfg(folder, precision=precision, query_runtime="onnx"))
    onnx = _unit([model.get_query_embedding(q) for q in QUESTIONS])
    reference = _unit([torch_model.get_query_embedding(q) for q in QUESTIONS])
    assert model.query_runtime == "onnx" and torch_model.query_runtime == "torch"
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    # fp32 graph against fp32 torch: rounding only
    assert (onnx * reference).sum(axis=1).min() > 0.99999
    # and another question's vector is not that close: the comparison can fail
    assert float(onnx[0] @ reference[1]) < 0.9


@pytest.mark.slow
def test_onnx_queries_carry_the_same_instruction_as_torch_ones(folder):
    from rag_app.components.embedding import build_embed_model

    vectors = {}
    for runtime in ("torch", "onnx"):
        for instruction in (BGE_PROMPT, ""):
            cfg = _cfg(
                folder, precision="fp32", query_runtime=runtime, query_instruction=instruction
            )
            model = build_embed_model(cfg)
            vectors[runtime, instruction] = np.asarray(model.get_query_embedding("what is HNSW"))
    assert float(vectors["onnx", BGE_PROMPT] @ vectors["torch", BGE_PROMPT]) > 0.99999
    assert float(vectors["onnx", ""] @ vectors["torch", ""]) > 0.99999
    assert float(vectors["onnx", BGE_PROMPT] @ vectors["onnx", ""]) < 0.99


@pytest.mark.slow
def test_auto_falls_back_to_torch_where_the_export_fails(tmp_path, monkeypatch, caplog):
    from rag_app.components.embedding import build_embed_model, onnx

    copy = model_copy(tmp_path / "all-MiniLM-L6-v2")

    def refused(*args, **kwargs):  # the fault: the export cannot be written
        raise OSError("[Errno 28] No space left on device")

    monkeypatch.setattr(onnx, "ensure_onnx_model", refused)
    auto = build_embed_model(_cfg(copy, precision="fp32"))
    with caplog.at_level("WARNING"):
        vector = auto.get_query_embedding(HNSW_QUESTION)
        auto.get_query_embedding("again")
    assert auto.query_runtime == "torch"
    assert caplog.text.count("queries are embedded with torch") == 1
    assert "No space left on device" in caplog.text
    torch_only = build_embed_model(_cfg(copy, precision="fp32", query_runtime="torch"))
    assert vector == pytest.approx(torch_only.get_query_embedding(HNSW_QUESTION), abs=1e-6)

    required = build_embed_model(_cfg(copy, precision="fp32", query_runtime="onnx"))
    with pytest.raises(RagAppError) as caught:
        required.get_query_embedding(HNSW_QUESTION)
    message = str(caught.value)
    assert "No space left on device" in message and 'query_runtime = "torch"' in message
    assert "\n" not in message
