"""Chunks that carry their context, on a real Milvus Lite file with MiniLM (slow tier): what is
embedded and what BM25 indexes holds the title, section path and source; the LLM and the
sources get the chunk's text; the template is part of the sync; older collections work."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import PROFILE
from llama_index.core.schema import MetadataMode

from rag_app import build_index, build_retriever, build_vector_store, ingest_path, load_config
from rag_app.components.embedding import model_identity
from rag_app.components.vector_store import (
    CONTEXT_FIELD,
    EMBEDDING_FIELD,
    MODEL_PROPERTY,
    SPARSE_FIELD,
    RagMilvusVectorStore,
)
from rag_app.pipelines.answer import source_dicts

pytestmark = [pytest.mark.slow, pytest.mark.bm25]

# "quokka" is only in the front matter title, "wombat" only in a heading: most chunks of
# these pages do not contain the word.
QUOKKA = "---\ntitle: Quokka migration notes\n---\n" + "\n\n".join(
    f"Step {n}: copy the data of table {n} to the new cluster, then check its row count."
    for n in range(1, 9)
)
WOMBAT = "# Cluster settings\n\n## Wombat tuning\n\n" + "\n\n".join(
    f"Raise the buffer of worker {n} before the nightly job, and lower it after."
    for n in range(1, 9)
)
OTHER = "# Backups\n\nBackups run every night and keep seven copies of each table.\n"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "ops").mkdir(parents=True)
    (root / "ops" / "quokka.md").write_text(QUOKKA)
    (root / "ops" / "wombat.md").write_text(WOMBAT)
    (root / "backups.md").write_text(OTHER)
    return root


@pytest.fixture
def cfg(tmp_path: Path):
    return load_config(
        PROFILE,
        milvus__uri=str(tmp_path / "milvus.db"),
        chunking__chunk_size=100,
        chunking__chunk_overlap=0,
    )


def rows(store) -> list[dict]:
    return store.client.query(
        store.collection_name,
        filter='id != ""',
        output_fields=["id", "doc_id", "text", CONTEXT_FIELD, EMBEDDING_FIELD],
        consistency_level="Strong",
    )


def sparse(cfg, embed_model, store, question: str, top_k: int = 10):
    cfg = cfg.model_copy(deep=True)
    cfg.retrieval.mode, cfg.retrieval.dedupe = "sparse", False
    index = build_index(cfg, embed_model=embed_model, vector_store=store)
    return build_retriever(cfg, index, top_k=top_k).retrieve(question)


def test_embedded_and_bm25_text_carry_the_context_and_the_llm_text_does_not(
    cfg, folder, embed_model
):
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
    stored = rows(store)
    assert len(stored) > 8
    for row in stored:
        header, _, body = row[CONTEXT_FIELD].partition("\n\n")
        assert body == row["text"]
        assert row["doc_id"] in header  # the source
        vector = np.array(embed_model.get_text_embedding(row[CONTEXT_FIELD]))
        assert float(vector @ np.array(row[EMBEDDING_FIELD])) > 0.99  # what was embedded
    wombat = [r for r in stored if r["doc_id"] == "ops/wombat.md"]
    assert all(
        r[CONTEXT_FIELD].startswith("Cluster settings > Wombat tuning\nops/wombat.md")
        for r in wombat
    )
    quokka = [r for r in stored if r["doc_id"] == "ops/quokka.md"]
    assert all(r[CONTEXT_FIELD].startswith("Quokka migration notes\nops/quokka.md") for r in quokka)

    hits = sparse(cfg, embed_model, store, "wombat")
    for hit in hits:
        llm = hit.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "Wombat tuning" not in llm.replace("## Wombat tuning", "")
        assert "Cluster settings > " not in llm and CONTEXT_FIELD not in hit.node.metadata
    for source in source_dicts(hits):
        assert "Cluster settings > " not in source["text"]


def test_bm25_finds_chunks_by_a_word_only_in_their_title_or_heading(cfg, folder, embed_model):
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
    for word, doc_id in (("quokka", "ops/quokka.md"), ("wombat", "ops/wombat.md")):
        expected = {r["id"] for r in rows(store) if r["doc_id"] == doc_id}
        bodies_without = {
            r["id"] for r in rows(store) if r["doc_id"] == doc_id and word not in r["text"].lower()
        }
        assert len(bodies_without) >= 3, word  # the test means something
        hits = sparse(cfg, embed_model, store, word, top_k=len(expected) + 3)
        found = {hit.node.node_id for hit in hits}
        assert bodies_without <= found, (word, found)
        assert {hit.node.ref_doc_id for hit in hits} == {doc_id}


def test_a_changed_template_re_embeds_and_an_unchanged_one_does_not(cfg, folder, embed_model):
    store = build_vector_store(cfg, embed_model)
    first = ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
    assert (first.added, first.updated, first.unchanged) == (3, 0, 0)
    again = ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
    assert (again.added, again.updated, again.unchanged, again.chunks) == (0, 0, 3, 0)

    changed = cfg.model_copy(deep=True)
    changed.chunking.context_template = "{source}"
    report = ingest_path(changed, folder, embed_model=embed_model, vector_store=store)
    assert (report.added, report.updated, report.unchanged, report.deleted) == (0, 3, 0, 0)
    assert all(
        r[CONTEXT_FIELD] == f"{r['doc_id']}\n\n{r['text']}" for r in rows(store)
    )  # the old version's rows are gone
    assert not sparse(changed, embed_model, store, "migration")  # the title is not indexed now


def create_collection_as_before(cfg, dim: int) -> None:
    """A collection as rag_app created them before the context template: BM25 from 'text'."""
    from llama_index.vector_stores.milvus.utils import BM25BuiltInFunction

    RagMilvusVectorStore(  # type: ignore[call-arg]
        retry_seconds=5,
        uri=cfg.milvus.uri,
        collection_name=cfg.milvus.collection,
        dim=dim,
        embedding_field=EMBEDDING_FIELD,
        similarity_metric="IP",
        upsert_mode=True,
        collection_properties={MODEL_PROPERTY: model_identity(cfg.embedding.model)},
        enable_sparse=True,
        sparse_embedding_field=SPARSE_FIELD,
        sparse_embedding_function=BM25BuiltInFunction(
            input_field_names="text", output_field_names=SPARSE_FIELD
        ),
    ).client.close()


def test_a_collection_from_before_keeps_working_with_bm25_over_the_bare_text(
    cfg, folder, embed_model, caplog
):
    create_collection_as_before(cfg, 384)
    store = build_vector_store(cfg, embed_model)
    assert store.context_field is None
    with caplog.at_level(logging.WARNING, logger="rag_app.pipelines.ingest"):
        report = ingest_path(cfg, folder, embed_model=embed_model, vector_store=store)
    assert report.added == 3
    warning = [r.getMessage() for r in caplog.records if "before chunks carried" in r.getMessage()]
    assert len(warning) == 1 and "new milvus.collection" in warning[0]
    described = store.client.describe_collection(store.collection_name)
    assert CONTEXT_FIELD not in {field["name"] for field in described["fields"]}
    stored = store.client.query(
        store.collection_name, filter='id != ""', output_fields=["*"], consistency_level="Strong"
    )
    assert len(stored) > 8 and all(CONTEXT_FIELD not in row for row in stored)
    # BM25 reads the bare text there: a body word is found, a title-only word is not.
    assert {h.node.ref_doc_id for h in sparse(cfg, embed_model, store, "buffer worker")} == {
        "ops/wombat.md"
    }
    assert not sparse(cfg, embed_model, store, "migration")
    # Dense search embeds the context there too.
    dense = cfg.model_copy(deep=True)
    dense.retrieval.mode = "dense"
    index = build_index(dense, embed_model=embed_model, vector_store=store)
    hits = build_retriever(dense, index, top_k=3).retrieve("quokka migration notes")
    assert hits[0].node.ref_doc_id == "ops/quokka.md"
