"""Retrieval evaluation: hit@1, hit@k, MRR and nDCG@k of the documents a retriever finds.

A QA file has one JSON object per line: ``{"question": ..., "sources": [paths], ...}``,
the paths relative to the ingested folder (as stored in each chunk's ``source``). Scores
are per document, not per chunk: the retrieved chunks are reduced to their documents,
best first, each counted once. Questions with no sources (the documents cannot answer
them) are kept in the file for abstention tests and left out of these scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llama_index.core.schema import NodeWithScore

from rag_app.errors import RagAppError

CHUNKS_PER_DOCUMENT = 4  # chunks retrieved per document ranked, so k distinct documents appear


@dataclass(frozen=True)
class QAItem:
    question: str
    sources: tuple[str, ...]
    kind: str = ""


@dataclass
class RetrievalScores:
    k: int
    questions: int = 0
    hit_at_1: float = 0.0
    hit_at_k: float = 0.0
    mrr: float = 0.0
    ndcg_at_k: float = 0.0
    per_question: list[dict[str, object]] = field(default_factory=list, repr=False)

    def row(self) -> str:
        return (
            f"hit@1 {self.hit_at_1:.3f}  hit@{self.k} {self.hit_at_k:.3f}  "
            f"MRR {self.mrr:.3f}  nDCG@{self.k} {self.ndcg_at_k:.3f}  ({self.questions} questions)"
        )

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def load_qa(path: str | Path) -> list[QAItem]:
    """Read a QA file; a malformed line is a one-line error naming the file and line."""
    file = Path(path)
    if not file.is_file():
        raise RagAppError(f"QA file not found: {file}")
    items = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, sources = row["question"], row.get("sources", [])
            if not isinstance(question, str) or not isinstance(sources, list):
                raise TypeError("question must be a string and sources a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise RagAppError(
                f"{file}:{number}: not a QA line ({type(exc).__name__}: {exc}); expected "
                '{"question": "...", "sources": ["path", ...]}'
            ) from None
        items.append(QAItem(question, tuple(str(s) for s in sources), str(row.get("kind", ""))))
    if not items:
        raise RagAppError(f"no questions in {file}")
    return items


def ranked_documents(nodes: Iterable[NodeWithScore], k: int) -> list[str]:
    """The sources of retrieved chunks, best first, each once, at most ``k``."""
    ranked: list[str] = []
    for node in nodes:
        metadata = node.node.metadata
        source = str(metadata.get("source") or node.node.ref_doc_id or "")
        if source and source not in ranked:
            ranked.append(source)
    return ranked[:k]


def score(items: Sequence[QAItem], rankings: Sequence[Sequence[str]], k: int) -> RetrievalScores:
    """Binary-relevance scores of each question's ranking against its sources."""
    scores = RetrievalScores(k=k)
    for item, ranking in zip(items, rankings, strict=True):
        if not item.sources:
            continue
        relevant = set(item.sources)
        ranks = [rank for rank, doc in enumerate(ranking[:k], 1) if doc in relevant]
        dcg = sum(1 / math.log2(rank + 1) for rank in ranks)
        ideal = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
        scores.questions += 1
        scores.hit_at_1 += 1.0 if ranks and ranks[0] == 1 else 0.0
        scores.hit_at_k += 1.0 if ranks else 0.0
        scores.mrr += 1 / ranks[0] if ranks else 0.0
        scores.ndcg_at_k += dcg / ideal
        scores.per_question.append(
            {"question": item.question, "sources": list(item.sources), "ranking": list(ranking)}
        )
    if scores.questions:
        for name in ("hit_at_1", "hit_at_k", "mrr", "ndcg_at_k"):
            setattr(scores, name, getattr(scores, name) / scores.questions)
    return scores


def evaluate_retrieval(
    items: Sequence[QAItem], retrieve: Callable[[str], list[NodeWithScore]], k: int = 5
) -> RetrievalScores:
    """Run ``retrieve`` (e.g. ``index.as_retriever(similarity_top_k=4 * k).retrieve``) on
    each answerable question and score the documents it finds."""
    answerable = [item for item in items if item.sources]
    rankings = [ranked_documents(retrieve(item.question), k) for item in answerable]
    return score(answerable, rankings, k)
