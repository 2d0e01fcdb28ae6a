"""Ingestion into real Milvus (a Lite file, and a server process) with the real MiniLM model,
and retrieval from it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HNSW_QUESTION, REPO
from llama_index.core.schema import TextNode
from llama_index.vector_stores.milvus import MilvusVectorStore
from pymilvus import MilvusClient

from rag_app import RagAppError, build_index, build_vector_store, ingest_path

pytestmark = pytest.mark.slow


def rows(store: MilvusVectorStore, expr: str = 'id != ""', fields=("id", "doc_id", "text")):
    return store.client.query(
        store.collection_name, filter=expr, output_fields=list(fields), consistency_level="Strong"
    )


def test_ingest_reports_documents_and_chunks_of_the_slice(ingested, corpus_slice):
    report, store = ingested
    assert report.documents == len(list(corpus_slice.rglob("*.md")))
    assert report.chunks == len(rows(store))
    assert not report.skipped
    assert max(len(r["text"]) for r in rows(store)) <= 512


def test_the_hnsw_question_retrieves_the_in_memory_index_page_first(slice_index):
    results = slice_index[1].as_retriever(similarity_top_k=3).retrieve(HNSW_QUESTION)
    assert results[0].node.metadata["source"] == "reference/index.md"
    assert results[0].node.metadata["title"] == "In-memory Index"
    assert "HNSW" in results[0].node.get_content()
    assert results[0].score >= results[1].score >= results[2].score


def test_each_stored_vector_has_unit_norm(ingested):
    _, store = ingested
    stored = rows(store, fields=("embedding",))[:50]
    for row in stored:
        assert math.isclose(math.sqrt(sum(x * x for x in row["embedding"])), 1.0, abs_tol=1e-3)


def test_query_instruction_goes_on_queries_only(small_cfg):
    from rag_app import build_embed_model

    cfg = small_cfg.model_copy(deep=True)
    cfg.embedding.query_instruction = "Represent this sentence for searching relevant passages: "
    model = build_embed_model(cfg)
    question = "what is HNSW"
    query = np.array(model.get_query_embedding(question))
    with_prefix = np.array(model.get_text_embedding(cfg.embedding.query_instruction + question))
    bare = np.array(model.get_text_embedding(question))
    # Queries run through the fp32 ONNX graph, texts through torch in bf16: equal up to bf16.
    assert float(query @ with_prefix) > 0.9999
    assert float(query @ bare) < 0.99


def test_bf16_embeddings_are_unit_vectors_pointing_where_fp32_ones_do(small_cfg, embed_model):
    from rag_app import build_embed_model

    assert small_cfg.embedding.precision == "bf16"
    fp32 = build_embed_model(
        small_cfg.model_copy(
            update={"embedding": small_cfg.embedding.model_copy(update={"precision": "fp32"})}
        )
    )
    texts = ["HNSW builds a graph of vectors.", "Partitions split a collection.", HNSW_QUESTION]
    for low, full in zip(
        embed_model.get_text_embedding_batch(texts),
        fp32.get_text_embedding_batch(texts),
        strict=True,
    ):
        assert math.isclose(math.sqrt(sum(x * x for x in low)), 1.0, abs_tol=1e-3)
        assert sum(a * b for a, b in zip(low, full, strict=True)) > 0.99
    assert next(fp32._model.parameters()).dtype != next(embed_model._model.parameters()).dtype


def test_collection_records_its_embedding_model(ingested):
    _, store = ingested
    info = store.client.describe_collection(store.collection_name)
    assert info["properties"]["rag_app.embedding_model"] == "all-MiniLM-L6-v2"


def test_reingest_replaces_in_place_and_drops_stale_chunks(store_cfg, embed_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("---\ntitle: Alpha\n---\n" + "Alpha paragraph about vectors. " * 80)
    (docs / "b.txt").write_text("Bravo text about Milvus collections. " * 10)
    store = build_vector_store(store_cfg, embed_model)
    first = ingest_path(store_cfg, docs, embed_model=embed_model, vector_store=store)
    assert first.documents == 2 and first.chunks == len(rows(store))
    a_chunks = len(rows(store, 'doc_id == "a.md"'))
    assert a_chunks > 2

    ingest_path(store_cfg, docs, embed_model=embed_model, vector_store=store)
    assert len(rows(store)) == first.chunks  # no duplicates

    (docs / "a.md").write_text("---\ntitle: Alpha\n---\nAlpha is now one short paragraph.")
    ingest_path(store_cfg, docs, embed_model=embed_model, vector_store=store)
    a_rows = rows(store, 'doc_id == "a.md"')
    assert [r["text"] for r in a_rows] == ["Alpha is now one short paragraph."]
    assert len(rows(store, 'doc_id == "b.txt"')) == first.chunks - a_chunks


def test_html_is_reduced_to_its_text(store_cfg, embed_model, tmp_path):
    page = tmp_path / "site" / "page.html"
    page.parent.mkdir()
    page.write_text(
        "<html><head><title>Tuning</title><style>body{color:red}</style>"
        "<script>var tracking = 1;</script></head><body><nav>Home | Docs</nav>"
        "<main><h1>Tuning HNSW</h1><p>Raise <b>ef</b> for better recall.</p></main>"
        "<footer>Copyright</footer></body></html>"
    )
    store = build_vector_store(store_cfg, embed_model)
    ingest_path(store_cfg, page.parent, embed_model=embed_model, vector_store=store)
    (row,) = rows(store, fields=("text", "title", "doc_type"))
    assert row["text"] == "# Tuning HNSW\nRaise ef for better recall."  # a Markdown heading
    assert (row["title"], row["doc_type"]) == ("Tuning", "html")


def test_unreadable_and_oversized_files_are_skipped_and_reported(store_cfg, embed_model, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# Good\nA readable page about partitions.")
    (docs / "blob.txt").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "empty.md").write_text("")
    (docs / "latin1.txt").write_bytes("Café crème, déjà vu.".encode("latin-1"))
    (docs / "huge.log.txt").write_bytes(b"a line of a very long server log\n" * 640_000)  # 20 MB
    store = build_vector_store(store_cfg, embed_model)
    report = ingest_path(store_cfg, docs, embed_model=embed_model, vector_store=store)
    skipped = {Path(path).name: reason for path, reason in report.skipped}
    assert set(skipped) == {"blob.txt", "broken.pdf", "empty.md", "huge.log.txt"}
    assert "binary" in skipped["blob.txt"] and "PDF" in skipped["broken.pdf"]
    assert "no text" in skipped["empty.md"]
    assert skipped["huge.log.txt"] == "20.1 MB, over ingestion.max_file_mb = 10"
    assert report.documents == 2
    assert {r["doc_id"] for r in rows(store)} == {"good.md", "latin1.txt"}
    assert "Café crème, déjà vu." in rows(store, 'doc_id == "latin1.txt"')[0]["text"]
    assert "skipped 4" in report.summary()


def test_an_empty_folder_is_a_one_line_error(small_cfg, embed_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RagAppError, match=r"no documents to ingest in .*empty \(looked for"):
        ingest_path(small_cfg, tmp_path / "empty", embed_model=embed_model)
    with pytest.raises(RagAppError, match="no such file or folder"):
        ingest_path(small_cfg, tmp_path / "nowhere", embed_model=embed_model)


def test_a_missing_embedding_model_is_a_one_line_error(small_cfg):
    from rag_app import build_embed_model

    cfg = small_cfg.model_copy(deep=True)
    cfg.embedding.model = str(REPO / ".models" / "no-such-model")
    with pytest.raises(
        RagAppError, match=r"embedding model folder not found: .*no-such-model .*fetch_models"
    ):
        build_embed_model(cfg)
    cfg.embedding.model = "BAAI/bge-large-en-v1.5"  # a hub id, with the hub unreachable
    with pytest.raises(
        RagAppError, match=r"cannot load embedding model 'BAAI/bge-large-en-v1\.5'"
    ) as error:
        build_embed_model(cfg)
    assert "\n" not in str(error.value)


def _foreign_collection(cfg, dim: int, model: str | None) -> None:
    """A collection someone else filled: another model, or another dimension."""
    MilvusVectorStore(
        uri=cfg.milvus.uri,
        collection_name=cfg.milvus.collection,
        dim=dim,
        collection_properties={"rag_app.embedding_model": model} if model else None,
    ).add([TextNode(id_="keep#0", text="precious", embedding=[1.0] + [0.0] * (dim - 1))])


@pytest.mark.parametrize(
    ("dim", "model", "message"),
    [
        (
            1024,
            "bge-large-en-v1.5",
            "was embedded with 'bge-large-en-v1.5', not 'all-MiniLM-L6-v2'",
        ),
        (1024, None, "was not made by rag_app"),  # another tool's: refused, whatever its dim
        ("adopt", None, "holds 1024-d vectors but 'all-MiniLM-L6-v2' makes 384-d ones"),
    ],
)
def test_a_collection_of_another_model_is_refused_and_kept(
    store_cfg, embed_model, tmp_path, dim, model, message
):
    if dim == "adopt":  # taken over explicitly: still refused for its dimension
        dim, store_cfg.milvus.adopt_foreign_collection = 1024, True
    _foreign_collection(store_cfg, dim, model)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("Some text.")
    with pytest.raises(RagAppError, match=message):
        ingest_path(store_cfg, docs, embed_model=embed_model)
    with pytest.raises(RagAppError, match=message):
        build_index(store_cfg, embed_model=embed_model)
    client = MilvusClient(uri=store_cfg.milvus.uri)
    kept = client.query(store_cfg.milvus.collection, filter='id != ""', output_fields=["text"])
    assert [r["text"] for r in kept] == ["precious"]


def test_cli_ingest_prints_a_summary_and_errors_in_one_line(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nShort page about consistency levels.")
    env_cfg = ["--config", str(REPO / "configs" / "cpu-small.toml")]
    env = {"RAG_APP_MILVUS__URI": str(tmp_path / "cli.db"), "HF_HUB_OFFLINE": "1", "PATH": ""}
    ok = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ingest.py"), str(docs), *env_cfg],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and "Method not implemented" not in ok.stderr
    assert ok.stdout.strip().startswith(
        "ingested 1 documents: 1 added, 0 updated, 0 unchanged, 0 deleted; 1 chunks written in "
    )
    (tmp_path / "empty").mkdir()
    bad = subprocess.run(
        [sys.executable, "-m", "rag_app.cli", "ingest", str(tmp_path / "empty"), *env_cfg],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"rag-app: error: no documents to ingest in {tmp_path / 'empty'} "
        "(looked for .docx, .htm, .html, .markdown, .md, .pdf, .txt)"
    ]


def test_a_missing_llm_model_is_a_one_line_error_before_any_engine_starts(small_cfg):
    from rag_app import build_llm

    cfg = small_cfg.model_copy(deep=True)
    cfg.llm.model = str(REPO / ".models" / "no-such-llm")
    with pytest.raises(RagAppError, match=r"LLM model folder not found: .*no-such-llm"):
        build_llm(cfg)
