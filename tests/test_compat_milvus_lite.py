"""Guard of rag_app/compat/milvus_lite.py, which patches milvus-lite's private BM25 search:
it fails when milvus-lite changes, so the patch is checked (and dropped once upstream scores
with collection-wide statistics itself), and its NumPy scorer is compared with Lite's own."""

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


def random_index(seed: int, rows: int = 300, vocabulary: int = 40) -> tuple[object, list]:
    """A Lite BM25 index over random term counts: common and rare terms, empty rows, and
    rows with equal counts and lengths (tied scores)."""
    import random

    from milvus_lite.index.sparse_inverted import SparseInvertedIndex

    rng = random.Random(seed)
    vectors: list[dict[int, float]] = []
    for _ in range(rows):
        if rng.random() < 0.05:
            vectors.append({})
            continue
        terms = rng.sample(range(vocabulary), rng.randint(1, 8))
        vectors.append({t: float(rng.choice([1, 1, 1, 2, 3, 7])) for t in terms})
    vectors += [{3: 2.0, 5: 1.0}] * 4  # identical rows: equal scores, ordered by row
    index = SparseInvertedIndex()
    index.build(vectors)
    return index, vectors


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bm25_top_k_ranks_exactly_as_milvus_lite_does(seed):
    """The NumPy scorer replaces Lite's per-posting Python loop: same ids, same float32
    scores, same order of ties, with and without a row mask and collection-wide statistics."""
    import random

    import numpy as np
    from milvus_lite.index.sparse_inverted import SparseInvertedIndex

    assert milvus_lite.install()
    lite_search = SparseInvertedIndex.search.__wrapped__
    index, vectors = random_index(seed)
    rng = random.Random(seed)
    queries = [{t: 1.0 for t in rng.sample(range(45), rng.randint(1, 6))} for _ in range(30)]
    queries += [{}, {999: 1.0}, {3: 1.0, 5: 1.0}, {7: 0.5, 11: 2.0}]  # empty, unknown, ties
    mask = np.array([rng.random() < 0.7 for _ in vectors])
    own = milvus_lite.CorpusStatistics(index.doc_count, index.avgdl, index._df)
    # A collection three times this segment's size: Lite scores it with these swapped in.
    wider = milvus_lite.CorpusStatistics(
        index.doc_count * 3, index.avgdl * 1.3, {t: 3 * index._df.get(t, 0) + 1 for t in range(45)}
    )
    swapped = random_index(seed)[0]
    swapped.doc_count, swapped.avgdl = wider.rows, wider.average_length
    swapped._df = wider.document_frequency
    for top_k in (0, 5, 50, 1000):
        for valid in (None, mask):
            for stats, lite_index in ((own, index), (wider, swapped)):
                ids, distances = milvus_lite.bm25_top_k(index, queries, top_k, valid, stats)
                want_ids, want_distances = lite_search(lite_index, queries, top_k, valid)
                assert ids.tolist() == want_ids.tolist()
                assert distances.tolist() == want_distances.tolist()
    tied = milvus_lite.bm25_top_k(index, [{3: 1.0, 5: 1.0}], 1000, None, own)[0][0].tolist()
    last = len(vectors) - 4
    assert [row for row in tied if row >= last] == [last, last + 1, last + 2, last + 3]


def test_bm25_top_k_reuses_posting_arrays_until_the_index_is_rebuilt():
    index, vectors = random_index(4)
    stats = milvus_lite.CorpusStatistics(index.doc_count, index.avgdl, index._df)
    milvus_lite.bm25_top_k(index, [{3: 1.0}], 5, None, stats)
    first = milvus_lite._postings(index, 3)
    assert milvus_lite._postings(index, 3) is first
    index.build(vectors[-10:])  # the last four rows hold term 3
    rebuilt = milvus_lite._postings(index, 3)
    assert rebuilt is not None and rebuilt is not first
    assert rebuilt[0].tolist() == [row for row, v in enumerate(vectors[-10:]) if 3 in v]


@pytest.mark.slow
def test_opening_a_lite_file_keeps_numpys_blas_to_one_thread(tmp_path):
    """Lite's searches run in this process: OpenBLAS's threads, spinning after each, would
    take the CPU the next question's embedding needs."""
    import subprocess
    import sys

    script = (
        "import threadpoolctl\n"
        "from rag_app import load_config\n"
        "from rag_app.components.vector_store import _connect\n"
        "blas = lambda: [p['num_threads'] for p in threadpoolctl.threadpool_info()"
        " if p['user_api'] == 'blas']\n"
        "before = blas()\n"
        f"_connect(load_config(milvus__uri={str(tmp_path / 'm.db')!r})).close()\n"
        "print(before, sorted(set(blas())))\n"
    )
    env = {"OPENBLAS_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout.split("\n")[-2]
    assert out == "[2] [1]", out
