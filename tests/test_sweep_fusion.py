"""scripts/sweep_fusion.py's fusions follow the formulas they are named for (fast tier; that
its weighted fusion is Milvus's own is checked against Milvus in test_bench_retrieval.py)."""

from __future__ import annotations

import math

import pytest
from test_bench_retrieval import _script

HITS = {
    "dense": [("a", "A.md", 0.9), ("b", "B.md", 0.5)],
    "sparse": [("b", "B.md", 10.0), ("c", "C.md", 4.0)],
}


def fused(fusion) -> dict[str, float]:
    return {cid: score for cid, _doc, score in fusion(HITS)}


def test_rrf_sums_one_over_k_plus_rank():
    scores = fused(_script("sweep_fusion").rrf(60, 20))
    assert scores == pytest.approx({"b": 1 / 62 + 1 / 61, "a": 1 / 61, "c": 1 / 62})
    assert list(scores) == ["b", "a", "c"]


def test_min_max_scales_each_side_to_zero_one_then_weighs_it():
    scores = fused(_script("sweep_fusion").score_fusion(0.6, 20, spread=False))
    assert scores == pytest.approx({"a": 0.6, "b": 0.4, "c": 0.0})


def test_milvus_weighted_normalises_with_arctan_and_cuts_each_side_at_depth():
    scores = fused(_script("sweep_fusion").milvus_weighted(0.7, 1))
    assert scores == pytest.approx({
        "a": 0.7 * (0.5 + math.atan(0.9) / math.pi),
        "b": 0.3 * 2 * math.atan(10.0) / math.pi,
    })  # fmt: skip
