"""Many questions at once, so vLLM batches them instead of answering one after another.

Local mode hands every grounded prompt to the engine in one call (vLLM schedules them with
continuous batching); server mode sends the questions concurrently through the query
engine, and the server batches what arrives together. Each answer keeps its sources,
citations and abstention flag, as a single query would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llama_index.core import VectorStoreIndex
from llama_index.core.llms import LLM
from llama_index.core.schema import MetadataMode, NodeWithScore
from llama_index.core.vector_stores.types import MetadataFilters

from rag_app.components.llm import AsyncEngineVllm, build_llm
from rag_app.components.retrieval import build_retriever
from rag_app.config import RagConfig
from rag_app.pipelines.citations import check_citations
from rag_app.pipelines.query import (
    build_index,
    build_query_engine,
    excerpts_best_last,
    is_abstention,
    sources_str,
)
from rag_app.prompts import ABSTAIN_ANSWER, GROUNDED_QA_PROMPT


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[NodeWithScore] = field(default_factory=list)
    seconds: float = 0.0  # from the start of the batch to this answer
    completion_tokens: int | None = None
    citations: list[int] = field(default_factory=list)

    @property
    def abstained(self) -> bool:
        return not self.sources or is_abstention(self.answer)


def answer_many(
    cfg: RagConfig,
    questions: Sequence[str],
    *,
    index: VectorStoreIndex | None = None,
    llm: LLM | None = None,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
    concurrency: int = 16,
) -> list[Answer]:
    """Answer ``questions`` together; answers come back in the questions' order."""
    index = index or build_index(cfg)
    llm = llm or build_llm(cfg)
    if isinstance(llm, AsyncEngineVllm):
        retriever = build_retriever(cfg, index, top_k=top_k, filters=filters)
        retrieved = [retriever.retrieve(question) for question in questions]
        return generate_batch(llm, questions, retrieved)
    engine = build_query_engine(cfg, index=index, llm=llm, top_k=top_k, filters=filters)
    started = time.perf_counter()

    def ask(question: str) -> Answer:
        response = engine.query(question)  # its answer's citations are checked already
        return Answer(
            question, str(response).strip(), list(response.source_nodes),
            time.perf_counter() - started, citations=(response.metadata or {})["citations"],
        )  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(ask, questions))


def generate_batch(
    llm: AsyncEngineVllm, questions: Sequence[str], retrieved: Sequence[list[NodeWithScore]]
) -> list[Answer]:
    """One engine call for all the questions that retrieved something relevant."""
    prompts = {
        i: grounded_prompt(llm, question, nodes)
        for i, (question, nodes) in enumerate(zip(questions, retrieved, strict=True))
        if nodes
    }
    started = time.perf_counter()
    completions = llm.complete_many(list(prompts.values()), formatted=True)
    replies = dict(zip(prompts, completions, strict=True))
    seconds = time.perf_counter() - started
    answers = []
    for i, (question, nodes) in enumerate(zip(questions, retrieved, strict=True)):
        if i not in replies:
            answers.append(Answer(question, ABSTAIN_ANSWER))
            continue
        text, cited = check_citations(replies[i].text.strip(), len(nodes))
        tokens = (replies[i].raw or {}).get("completion_tokens")
        answers.append(Answer(question, text, nodes, seconds, tokens, cited))
    return answers


def grounded_prompt(llm: AsyncEngineVllm, question: str, nodes: Sequence[NodeWithScore]) -> str:
    """The grounded prompt, rendered with the chat template, within the model's window.

    The same prompt the query engine sends (numbered excerpts, best last); when it would
    not leave room for the answer, the least relevant excerpts are left out.
    """
    budget = llm.context_window - llm.max_new_tokens
    texts = [n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes]
    for keep in range(len(nodes), 0, -1):
        context = "\n\n".join(excerpts_best_last(texts[:keep]))
        messages = GROUNDED_QA_PROMPT.format_messages(
            sources_str=sources_str(nodes[:keep]), context_str=context, query_str=question
        )
        rendered = llm.render_chat(messages)
        if len(llm.token_ids(rendered)) <= budget:
            return rendered
    return rendered
