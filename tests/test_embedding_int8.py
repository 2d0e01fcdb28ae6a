"""``embedding.precision = "int8"``: the real MiniLM exported to a dynamically quantized ONNX
graph and run by ONNX Runtime, against the same model in fp32, on real Milvus docs passages.

Each test works on a copy of the model folder (links to its files) in a temporary folder, so
the export is made fresh by the tests and never written into the shared ``.models/``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, HNSW_QUESTION, MINILM, PROFILE, SLICE, model_copy

from rag_app import RagAppError, load_config
from rag_app.config import RagConfig

# Measured against fp32 (docs/configuration.md): on 512 chunks of the Milvus docs, min 0.984,
# 1st percentile 0.986, median 0.993; on this test's slice, min 0.979 (bf16: 0.9999).
# Dynamic quantization scales activations per batch, so a chunk's vector depends a little on
# its batch-mates: the bound leaves room for that, the median bound catches a broken export.
MIN_COSINE = 0.97
MEDIAN_COSINE = 0.99
QUERIES = [
    HNSW_QUESTION,
    "How do I choose an index for vectors on disk?",
    "What does the consistency level control?",
    "How are search results from several vector fields reranked?",
    "What is memory mapping used for?",
]


def _cfg(model: Path, precision: str, **embedding: object) -> RagConfig:
    cfg = load_config(PROFILE)
    data = cfg.model_dump()
    data["embedding"].update(model=str(model), precision=precision, **embedding)
    return RagConfig.model_validate(data)


# --- fast: configuration, fingerprint, missing backend ------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_int8_on_a_gpu_device_is_refused_in_one_line(device):
    from rag_app.components.embedding import build_embed_model

    with pytest.raises(RagAppError) as caught:
        build_embed_model(_cfg(MINILM, "int8", device=device))
    message = str(caught.value)
    assert "CPU only" in message and 'precision = "bf16"' in message and device in message
    assert "\n" not in message


def test_int8_with_device_auto_is_refused_where_a_gpu_is_present():
    from rag_app.components.embedding import int8_device_refusal

    assert int8_device_refusal("cpu", lambda: True) is None
    assert int8_device_refusal("auto", lambda: False) is None
    refusal = int8_device_refusal("auto", lambda: True)
    assert refusal and "GPU is present" in refusal and 'device = "cpu"' in refusal


@pytest.mark.parametrize("package", ["onnxruntime", "onnx"])
def test_missing_onnx_backend_names_the_package_to_install(monkeypatch, package):
    from rag_app.components.embedding import build_embed_model

    monkeypatch.setitem(sys.modules, package, None)  # the fault: `import package` fails
    with pytest.raises(RagAppError) as caught:
        build_embed_model(_cfg(MINILM, "int8", device="cpu"))
    message = str(caught.value)
    assert f"needs the {package} package" in message and "pip install onnxruntime==" in message
    assert "\n" not in message


def test_switching_precision_to_int8_changes_the_sync_fingerprint():
    from llama_index.core import Document

    from rag_app.pipelines.ingest import fingerprint

    document = Document(text="HNSW builds a graph.", metadata={"title": "Index"})
    prints = {p: fingerprint(_cfg(MINILM, p), document) for p in ("fp32", "bf16", "int8")}
    assert len(set(prints.values())) == 3


def test_a_model_folder_that_cannot_be_written_exports_to_rag_apps_cache(tmp_path, monkeypatch):
    from rag_app.components.embedding import onnx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = model_copy(tmp_path / "all-MiniLM-L6-v2")  # no export beside it yet
    assert onnx.onnx_model_path(model).parent == model.resolve() / "onnx"
    monkeypatch.setattr(onnx, "_writable", lambda folder: False)  # the fault: read-only
    path = onnx.onnx_model_path(model)
    assert path.is_relative_to(tmp_path / "cache" / "rag_app" / "onnx")
    assert path.name == onnx.INT8_FILE and path.parent.name.startswith("all-MiniLM-L6-v2-")


# --- slow: the real model -------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_copy(tmp_path_factory.mktemp("int8") / "all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def models(int8_dir: Path):
    from rag_app.components.embedding import build_embed_model

    return {p: build_embed_model(_cfg(int8_dir, p)) for p in ("fp32", "int8")}


@pytest.fixture(scope="module")
def passages(models) -> list[str]:
    """The chunks rag_app makes of the test slice of the Milvus docs."""
    from llama_index.core.schema import MetadataMode, TextNode

    from rag_app.components.chunking import chunk_documents
    from rag_app.components.embedding import token_counter
    from rag_app.components.readers import load_documents

    files = [CORPUS / page for page in SLICE]
    documents = [d for _, d in load_documents(files, CORPUS) if not isinstance(d, Exception)]
    cfg = load_config(PROFILE)
    nodes = chunk_documents(cfg, documents, token_counter(models["int8"]))
    texts = [
        n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes if isinstance(n, TextNode)
    ]
    assert len(texts) > 50
    return texts


@pytest.mark.slow
def test_int8_vectors_are_unit_vectors_close_to_fp32_ones(models, passages):
    int8 = np.asarray(models["int8"].get_text_embedding_batch(passages), dtype=np.float64)
    fp32 = np.asarray(models["fp32"].get_text_embedding_batch(passages), dtype=np.float64)
    assert int8.shape == fp32.shape == (len(passages), 384)
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    cosines = (int8 * fp32).sum(axis=1)
    assert cosines.min() >= MIN_COSINE, f"min cosine {cosines.min():.4f}"
    assert np.median(cosines) >= MEDIAN_COSINE, f"median cosine {np.median(cosines):.4f}"


@pytest.mark.slow
def test_int8_ranks_passages_for_queries_as_fp32_does(models, passages):
    top = {}
    for precision, model in models.items():
        vectors = np.asarray(model.get_text_embedding_batch(passages))
        top[precision] = [
            np.argsort(-(vectors @ np.asarray(model.get_query_embedding(q))))[:5].tolist()
            for q in QUERIES
        ]
    for query, fp32, int8 in zip(QUERIES, top["fp32"], top["int8"], strict=True):
        # Near-ties between chunks of one page may swap; the best fp32 chunk stays near
        # the top and most of the top 5 is shared.
        assert fp32[0] in int8[:3], query
        assert len(set(int8) & set(fp32)) >= 3, query


@pytest.mark.slow
def test_int8_puts_the_query_instruction_on_queries_only(int8_dir, models):
    from rag_app.components.embedding import build_embed_model

    instruction = "Represent this sentence for searching relevant passages: "
    model = build_embed_model(_cfg(int8_dir, "int8", query_instruction=instruction))
    question = "what is HNSW"
    with_prefix = model.get_text_embedding(instruction + question)
    assert model.get_query_embedding(question) == pytest.approx(with_prefix, abs=1e-6)
    assert model.get_text_embedding(question) != pytest.approx(with_prefix, abs=1e-3)


@pytest.mark.slow
def test_int8_model_reports_dimension_and_counts_tokens(models):
    from rag_app.components.embedding import embedding_dimension, token_counter

    assert embedding_dimension(models["int8"]) == 384
    counted = token_counter(models["int8"])
    reference = token_counter(models["fp32"])
    assert counted and reference and counted[1] == reference[1] == 256
    text = "Milvus builds an HNSW index over the vectors of a collection."
    assert counted[0](text) == reference[0](text)


@pytest.mark.slow
def test_the_export_is_made_once_and_reused(int8_dir, models, caplog):
    from rag_app.components.embedding import build_embed_model
    from rag_app.components.embedding.onnx import INT8_FILE

    exported = int8_dir / "onnx" / INT8_FILE
    before = exported.stat()
    with caplog.at_level("WARNING"):
        again = build_embed_model(_cfg(int8_dir, "int8"))
    assert "exporting" not in caplog.text
    after = exported.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.get_text_embedding("HNSW") == models["int8"].get_text_embedding("HNSW")
    stamp = json.loads(exported.with_suffix(".json").read_text())
    assert stamp["weights"] == "model.safetensors"
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_model_and_the_next_build_exports(tmp_path, monkeypatch):
    import onnxruntime.quantization

    from rag_app.components.embedding import build_embed_model
    from rag_app.components.embedding.onnx import INT8_FILE

    folder = model_copy(tmp_path / "all-MiniLM-L6-v2")

    def killed(model_input, model_output, **kwargs):  # the fault: dies mid-write
        Path(model_output).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", killed)
    with pytest.raises(KeyboardInterrupt):
        build_embed_model(_cfg(folder, "int8"))
    assert not (folder / "onnx" / INT8_FILE).exists()
    assert not list((folder / "onnx").iterdir())  # no temporary files left either
    monkeypatch.undo()
    model = build_embed_model(_cfg(folder, "int8"))
    assert math.isclose(np.linalg.norm(model.get_text_embedding("HNSW")), 1.0, abs_tol=1e-5)


@pytest.mark.slow
def test_a_stale_export_is_made_again(tmp_path):
    from rag_app.components.embedding import build_embed_model
    from rag_app.components.embedding.onnx import INT8_FILE

    folder = model_copy(tmp_path / "all-MiniLM-L6-v2")
    build_embed_model(_cfg(folder, "int8"))
    stamp = folder / "onnx" / INT8_FILE
    stamp = stamp.with_suffix(".json")
    recorded = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**recorded, "size": recorded["size"] + 1}))  # other weights
    before = (folder / "onnx" / INT8_FILE).stat().st_mtime_ns
    build_embed_model(_cfg(folder, "int8"))
    assert (folder / "onnx" / INT8_FILE).stat().st_mtime_ns != before
    assert json.loads(stamp.read_text()) == recorded


@pytest.mark.slow
def test_ingest_and_query_with_int8_on_milvus_lite(int8_dir, models, corpus_slice, tmp_path):
    from rag_app import build_index, ingest_path

    cfg = _cfg(int8_dir, "int8")
    cfg.milvus.uri = str(tmp_path / "milvus.db")
    report = ingest_path(cfg, corpus_slice, embed_model=models["int8"], progress=False)
    assert (report.added, report.documents) == (len(SLICE), len(SLICE)) and report.chunks > 50
    again = ingest_path(cfg, corpus_slice, embed_model=models["int8"], progress=False)
    assert (again.unchanged, again.chunks) == (len(SLICE), 0)  # nothing re-embedded
    index = build_index(cfg, embed_model=models["int8"])
    results = index.as_retriever(similarity_top_k=3).retrieve(HNSW_QUESTION)
    assert results[0].node.metadata["source"] == "reference/index.md"
