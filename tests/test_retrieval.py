"""Retrieval modes (dense, BM25, hybrid), filters evaluated in Milvus, and postprocessing."""

from __future__ import annotations

import pytest
from conftest import HNSW_QUESTION, PROFILE
from llama_index.core.schema import NodeWithScore, TextNode

from rag_app import RagAppError, build_index, build_vector_store, ingest_path
from rag_app.cli import main as cli_main
from rag_app.components.retrieval import (
    MergeOverlapping,
    build_postprocessors,
    build_retriever,
    parse_filters,
)


def sources(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.metadata["source"] for n in nodes]


def with_retrieval(cfg, **settings):
    variant = cfg.model_copy(deep=True)
    for key, value in settings.items():
        setattr(variant.retrieval, key, value)
    return variant


@pytest.mark.bm25
def test_bm25_finds_an_exact_parameter_name(slice_index):
    cfg, index = slice_index
    sparse = with_retrieval(cfg, mode="sparse", dedupe=False)
    found = build_retriever(sparse, index, top_k=3).retrieve("efConstruction")
    assert len(found) >= 2  # only chunks holding the word score at all
    assert sources(found)[0] == "reference/index.md"
    assert all("efconstruction" in n.node.get_content().lower() for n in found)
    assert [n.score for n in found] == sorted((n.score for n in found), reverse=True)
    assert found[-1].score > 0  # BM25 scores, positive, best first


@pytest.mark.parametrize("fusion", ["rrf", "weighted"])
def test_hybrid_search_fuses_dense_and_bm25(session_cfg, ingested, embed_model, fusion):
    hybrid = with_retrieval(session_cfg, mode="hybrid", fusion=fusion)
    store = build_vector_store(hybrid, embed_model)
    assert store.hybrid_ranker == {"rrf": "RRFRanker", "weighted": "WeightedRanker"}[fusion]
    index = build_index(hybrid, embed_model=embed_model, vector_store=store)
    found = build_retriever(hybrid, index, top_k=3).retrieve(HNSW_QUESTION)
    assert "reference/index.md" in sources(found)
    assert len(found) == 3
    # Fused scores, not cosine ones: RRF adds 1 / (k + rank) from each of the two lists.
    ceiling = 2 / (hybrid.retrieval.rrf_k + 1) if fusion == "rrf" else 1.0
    assert all(0 < n.score <= ceiling for n in found)


@pytest.mark.parametrize("mode", ["dense", pytest.param("hybrid", marks=pytest.mark.bm25)])
def test_filters_are_evaluated_in_milvus_before_ranking(slice_index, mode):
    index = slice_index[1]
    cfg = with_retrieval(slice_index[0], mode=mode)
    filters = parse_filters(["source=reference/metric*", "doc_type=markdown"])
    found = build_retriever(cfg, index, top_k=3, filters=filters).retrieve(HNSW_QUESTION)
    # metric.md does not fill the top three for this question without the filter, yet three
    # of its chunks come back: the filter ran inside the search, not on its results.
    unfiltered = build_retriever(cfg, index, top_k=20).retrieve(HNSW_QUESTION)
    assert sources(unfiltered)[:3].count("reference/metric.md") < 2
    assert sources(found) == ["reference/metric.md"] * 3
    by_title = parse_filters(["title=In-memory Index"])
    assert set(sources(build_retriever(cfg, index, filters=by_title).retrieve(
        HNSW_QUESTION
    ))) == {"reference/index.md"}  # fmt: skip


@pytest.mark.parametrize("spec", ["source", "=x", "bad key=x", "source="])
def test_bad_filters_are_one_line_errors(spec):
    with pytest.raises(RagAppError, match="bad filter"):
        parse_filters([spec])


def test_filter_values_may_hold_any_character_but_undecodable_bytes():
    filters = parse_filters(['title=it\'s "quoted" \\ 100%', "source=a_b*"])
    assert [(f.key, f.value) for f in filters.filters] == [
        ("title", "it's \"quoted\" \\ 100%"), ("source", "a_b"),
    ]  # fmt: skip
    with pytest.raises(RagAppError, match="not valid Unicode text"):
        parse_filters(["source=caf\udce9"])  # a Latin-1 byte in argv


def test_cli_reports_a_bad_filter_before_starting_any_engine(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("rag_app.components.llm.build_llm", refuse)
    assert cli_main(["query", "q", "--filter", "source", "--config", str(PROFILE)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "rag-app: error: bad filter 'source': write KEY=VALUE or KEY=PREFIX* "
        "(e.g. source=reference/* or doc_type=markdown)"
    ]


def test_a_collection_without_bm25_refuses_hybrid_in_one_line_and_keeps_its_data(
    small_cfg, embed_model, tmp_path
):
    small_cfg.milvus.bm25 = False
    small_cfg.retrieval.mode = "dense"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\nPartitions split a collection.")
    store = build_vector_store(small_cfg, embed_model)
    ingest_path(small_cfg, tmp_path / "docs", embed_model=embed_model, vector_store=store)
    index = build_index(small_cfg, embed_model=embed_model, vector_store=store)
    for mode in ("hybrid", "sparse"):
        with pytest.raises(RagAppError, match="needs BM25, but collection 'rag_docs' was crea"):
            build_retriever(with_retrieval(small_cfg, mode=mode), index)
    assert len(build_retriever(small_cfg, index).retrieve("partitions")) == 1


def test_neighbouring_chunks_of_a_document_merge_into_one_passage():
    def hit(node_id: str, text: str, score: float) -> NodeWithScore:
        return NodeWithScore(node=TextNode(id_=node_id, text=text), score=score)

    merged = MergeOverlapping().postprocess_nodes(
        [
            hit("a.md#3", "the graph. Then search walks it.", 0.9),
            hit("b.md#0", "Another page.", 0.8),
            hit("a.md#2", "HNSW builds the graph.", 0.7),
            hit("a.md#7", "Far away in a.md.", 0.6),
        ]
    )
    assert [(n.node.node_id, n.node.get_content(), n.score) for n in merged] == [
        ("a.md#2", "HNSW builds the graph. Then search walks it.", 0.9),
        ("b.md#0", "Another page.", 0.8),
        ("a.md#7", "Far away in a.md.", 0.6),
    ]


def test_dense_only_options_are_refused_with_other_modes(session_cfg):
    with pytest.raises(ValueError, match="use them with mode = 'dense'"):
        with_retrieval(session_cfg, mode="hybrid", mmr=True)


def _mean_pairwise_similarity(embed_model, nodes) -> float:
    vectors = embed_model.get_text_embedding_batch([n.node.get_content() for n in nodes])
    pairs = [(a, b) for i, a in enumerate(vectors) for b in vectors[i + 1 :]]
    return sum(sum(x * y for x, y in zip(a, b, strict=True)) for a, b in pairs) / len(pairs)


def test_mmr_and_cutoff_shape_dense_results(session_cfg, session_index, embed_model):
    # Without merging: with it, the plain top chunk and its neighbour (alike, with one
    # context header) become one passage under the neighbour's id, while MMR, which keeps
    # only one of two alike chunks, returns the top chunk under its own.
    session_cfg = with_retrieval(session_cfg, mode="dense", dedupe=False)
    plain = build_retriever(session_cfg, session_index, top_k=3).retrieve(HNSW_QUESTION)
    cutoff = plain[1].score
    kept = build_retriever(
        with_retrieval(session_cfg, similarity_cutoff=cutoff), session_index, top_k=3
    ).retrieve(HNSW_QUESTION)
    assert [n.score for n in kept] == [n.score for n in plain[:2]]
    diverse = build_retriever(
        with_retrieval(session_cfg, mmr=True, mmr_threshold=0.1), session_index, top_k=3
    ).retrieve(HNSW_QUESTION)
    assert len(diverse) == 3
    assert diverse[0].node.node_id == plain[0].node.node_id  # the most relevant comes first
    # ... and the others are picked for being unlike it: less alike than the plain top 3.
    assert _mean_pairwise_similarity(embed_model, diverse) < _mean_pairwise_similarity(
        embed_model, plain
    )


@pytest.mark.slow
def test_a_missing_reranker_model_is_a_one_line_error(session_cfg, tmp_path):
    cfg = with_retrieval(
        session_cfg, rerank="cross-encoder", rerank_model=str(tmp_path / "no-such-reranker")
    )
    with pytest.raises(RagAppError, match=r"cannot load reranker .*no-such-reranker"):
        build_postprocessors(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("mmr", [False, True])
def test_a_search_returns_the_node_not_its_vectors_and_the_node_keeps_its_metadata(
    session_cfg, session_index, monkeypatch, mmr
):
    client = session_index.vector_store.client
    returned: list[set[str]] = []
    search = client.search

    def recorded(*args, **kwargs):  # the real search; what it returned is kept
        hits = search(*args, **kwargs)
        returned.extend(set(hit["entity"]) for hit in hits[0])
        return hits

    monkeypatch.setattr(client, "search", recorded)
    cfg = with_retrieval(session_cfg, mode="dense", mmr=mmr, dedupe=False)
    found = build_retriever(cfg, session_index, top_k=3).retrieve(HNSW_QUESTION)
    assert found and returned
    expected = {"_node_content", "_node_type", "text"} | ({"embedding"} if mmr else set())
    assert all(fields == expected for fields in returned), returned[0]
    for hit in found:
        assert {"source", "title", "section"} <= set(hit.node.metadata)
        assert hit.node.get_content()


def test_an_engine_given_only_the_config_opens_its_collection_with_one_embedding_model(
    session_cfg, ingested, embed_model, monkeypatch
):
    """What ``build_query_engine(cfg)`` and ``build_chat_engine(cfg)`` search when given
    neither index nor retriever: the configured collection, the model loaded once and
    shared by the index and the relevance gate."""
    import rag_app.components.embedding as embedding
    import rag_app.pipelines.query as query

    loads: list[object] = []

    def load(cfg):
        loads.append(cfg)
        return embed_model

    monkeypatch.setattr(query, "build_embed_model", load)
    monkeypatch.setattr(embedding, "build_embed_model", load)
    gated = with_retrieval(session_cfg, abstain_below=0.3)
    retriever = query.configured_retriever(gated, top_k=3)
    assert len(loads) == 1
    assert sources(retriever.retrieve(HNSW_QUESTION))[0] == "reference/index.md"
    assert retriever.retrieve("Who won the football World Cup in 1998?") == []  # the gate
    assert len(loads) == 1
