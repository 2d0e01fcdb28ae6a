"""Guard of rag_app/compat/milvus_lite.py, which patches milvus-lite's private BM25 search:
it fails when milvus-lite changes, so the patch is checked (and dropped once upstream scores
with collection-wide statistics itself)."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from pymilvus import DataType, Function, FunctionType, MilvusClient

from rag_app.compat import milvus_lite

TEXTS = {
    "a": "Milvus stores vectors in collections; a collection has fields and an index.",
    "b": "An index makes vector search fast; HNSW is a graph index of vectors.",
    "c": "Partitions split a collection; search can be limited to some partitions.",
    "d": "The zebra vault keeps one vector, and the vault code is 7731.",
}
QUESTION = "zebra vault vector index"


def test_written_for_the_installed_milvus_lite():
    assert version("milvus-lite") == milvus_lite.WRITTEN_FOR, (
        "milvus-lite changed: check whether Collection._search_sparse still scores each "
        "segment with its own BM25 statistics, then update or drop rag_app/compat/milvus_lite.py"
    )
    assert milvus_lite.install()


def bm25_collection(client: MilvusClient, name: str) -> None:
    schema = MilvusClient.create_schema()
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=8)
    schema.add_field("text", DataType.VARCHAR, max_length=1000, enable_analyzer=True)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    bm25 = Function(
        name="bm25", function_type=FunctionType.BM25,
        input_field_names=["text"], output_field_names=["sparse"],
    )  # fmt: skip
    schema.add_function(bm25)
    index = client.prepare_index_params()
    index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(name, schema=schema, index_params=index)


def scores(client: MilvusClient, name: str) -> dict[str, float]:
    hits = client.search(name, data=[QUESTION], anns_field="sparse", limit=10)[0]
    return {hit["id"]: abs(hit["distance"]) for hit in hits}


@pytest.mark.slow
def test_bm25_score_does_not_depend_on_where_a_row_is_stored(tmp_path):
    milvus_lite.install()
    client = MilvusClient(str(tmp_path / "milvus.db"))
    rows = [{"id": key, "text": text} for key, text in TEXTS.items()]
    bm25_collection(client, "together")
    client.insert("together", rows)
    bm25_collection(client, "apart")
    client.insert("apart", rows[:2])
    client.flush("apart")
    client.insert("apart", rows[2:3])
    client.flush("apart")
    client.insert("apart", rows[3:])  # segments of 2 and 1 rows, and the memtable

    expected = scores(client, "together")
    assert set(expected) == {"a", "b", "d"}
    assert scores(client, "apart") == pytest.approx(expected)
    client.flush("apart")
    assert scores(client, "apart") == pytest.approx(expected)
    client.close()
