"""The cross-encoder stage's wiring, offline: a tiny, randomly initialised BERT
cross-encoder built in the test stands in for bge-reranker (its scores mean nothing; what
is tested is that the reranker gets ``retrieval.candidates`` chunks, that its output is cut
to ``top_k``, and that the order is the model's own)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HNSW_QUESTION, REPO
from llama_index.core.postprocessor import SentenceTransformerRerank
from llama_index.core.schema import MetadataMode

from rag_app import RagAppError
from rag_app.components.retrieval import build_postprocessors, build_retriever

pytestmark = pytest.mark.slow
MINILM = REPO / ".models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def stand_in_reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cross-encoder folder as `hf download BAAI/bge-reranker-base` leaves one: one
    32-wide BERT layer with a single-logit head, and MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("reranker")
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(tokenizer), num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def variant(cfg, **settings):
    copy = cfg.model_copy(deep=True)
    for key, value in settings.items():
        setattr(copy.retrieval, key, value)
    return copy


def test_the_reranker_gets_the_candidates_and_keeps_top_k_in_its_own_order(
    session_cfg, session_index, stand_in_reranker, monkeypatch
):
    from sentence_transformers import CrossEncoder

    received: list = []
    rerank = SentenceTransformerRerank._postprocess_nodes

    def recording(self, nodes, query_bundle=None):
        received.append(list(nodes))
        return rerank(self, nodes, query_bundle)

    monkeypatch.setattr(SentenceTransformerRerank, "_postprocess_nodes", recording)
    candidates, top_k = 12, 4
    cfg = variant(
        session_cfg, mode="dense", dedupe=False, candidates=candidates,
        rerank="cross-encoder", rerank_model=str(stand_in_reranker),
    )  # fmt: skip
    reranked = build_retriever(cfg, session_index, top_k=top_k).retrieve(HNSW_QUESTION)

    # Widening: the reranker saw the candidates, the same the search alone returns for them.
    (seen,) = received
    plain = build_retriever(variant(cfg, rerank="none"), session_index, top_k=candidates)
    assert [n.node.node_id for n in seen] == [n.node.node_id for n in plain.retrieve(HNSW_QUESTION)]
    assert len(seen) == candidates

    # The cut and the order: the stand-in's own scores, best first.
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in seen]
    assert texts == [n.node.get_content() for n in seen]  # the bare chunk text, as documented
    scores = CrossEncoder(str(stand_in_reranker)).predict([(HNSW_QUESTION, t) for t in texts])
    best = sorted(range(candidates), key=lambda i: -float(scores[i]))[:top_k]
    assert len(reranked) == top_k
    assert [n.node.node_id for n in reranked] == [seen[i].node.node_id for i in best]
    assert [n.score for n in reranked] == pytest.approx([float(scores[i]) for i in best])
    # A random model does not keep the search's order (else the test proves nothing).
    assert [n.node.node_id for n in reranked] != [n.node.node_id for n in seen[:top_k]]


@pytest.mark.parametrize("kind", ["missing", "empty", "not a model"])
def test_a_reranker_folder_that_is_no_model_is_a_one_line_error(session_cfg, tmp_path, kind):
    folder = tmp_path / "reranker"
    if kind != "missing":
        folder.mkdir()
    if kind == "not a model":
        (folder / "config.json").write_text("{not json")
    cfg = variant(session_cfg, rerank="cross-encoder", rerank_model=str(folder))
    with pytest.raises(RagAppError) as caught:
        build_postprocessors(cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot load reranker")
    assert str(folder) in message and "retrieval.rerank_model" in message
