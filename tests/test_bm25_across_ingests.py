"""A document added by a later ingest is found by BM25 as if the folder had been ingested at
once, on a Lite file and on a Lite server (issue 11, item 0; see rag_app/compat/milvus_lite.py).

Milvus Lite flushes a collection's rows into a segment when the process holding a Lite file
exits, when a Lite server stops or its memtable fills, or on ``flush``. Rows written after
that were scored by BM25 against themselves alone. The tests flush between the two ingests
(what the end of the first ``rag-app ingest`` does to a Lite file), then search with the
new document's rows in the memtable and again once they are flushed into a segment of their
own (what the end of the second one does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import PROFILE

from rag_app import build_index, build_retriever, build_vector_store, ingest_path, load_config

pytestmark = [pytest.mark.slow, pytest.mark.bm25]  # Milvus 2.3 has no BM25

NEW_DOCUMENT = (
    "# Zebra project\n\nThe zebra project keeps its vault code here. The vault code of the "
    "zebra project is 7731. Ask the zebra project lead before you change the vault code.\n"
)
QUESTION = "vault code zebra project"  # "zebra" and "vault" are in no other document


def sparse_hits(cfg, embed_model, store) -> list[tuple[str, float]]:
    cfg = cfg.model_copy(deep=True)
    cfg.retrieval.mode = "sparse"
    index = build_index(cfg, embed_model=embed_model, vector_store=store)
    hits = build_retriever(cfg, index, top_k=5).retrieve(QUESTION)
    return [(hit.node.ref_doc_id or "", hit.score or 0.0) for hit in hits]


@pytest.fixture(scope="module")
def folder_with_new_document(tmp_path_factory, corpus_slice) -> Path:
    folder = tmp_path_factory.mktemp("with-new") / "docs"
    shutil.copytree(corpus_slice, folder)
    (folder / "zebra.md").write_text(NEW_DOCUMENT)
    return folder


@pytest.fixture(scope="module")
def one_pass_score(tmp_path_factory, folder_with_new_document, embed_model) -> float:
    """The new document's BM25 score when the whole folder is ingested at once."""
    cfg = load_config(PROFILE, milvus__uri=str(tmp_path_factory.mktemp("one") / "milvus.db"))
    store = build_vector_store(cfg, embed_model)
    ingest_path(cfg, folder_with_new_document, embed_model=embed_model, vector_store=store)
    hits = sparse_hits(cfg, embed_model, store)
    assert hits[0][0] == "zebra.md", hits
    return hits[0][1]


def test_document_of_a_later_ingest_ranks_as_in_one_ingest(
    store_cfg, embed_model, corpus_slice, folder_with_new_document, one_pass_score
):
    first = build_vector_store(store_cfg, embed_model)
    ingest_path(store_cfg, corpus_slice, embed_model=embed_model, vector_store=first)
    first.client.flush(first.collection_name)

    second = build_vector_store(store_cfg, embed_model)
    report = ingest_path(
        store_cfg, folder_with_new_document, embed_model=embed_model, vector_store=second
    )
    assert (report.added, report.unchanged) == (1, len(list(corpus_slice.rglob("*.md"))))

    in_memtable = sparse_hits(store_cfg, embed_model, second)
    second.client.flush(second.collection_name)
    in_own_segment = sparse_hits(store_cfg, embed_model, second)
    for hits in (in_memtable, in_own_segment):
        assert hits[0][0] == "zebra.md", hits
        assert one_pass_score / 2 <= hits[0][1] <= one_pass_score * 2, (hits, one_pass_score)
