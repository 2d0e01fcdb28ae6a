"""One way to finish an answer, for every caller (CLI, batches, chat, the HTTP service).

A finished :class:`Answer` has its citations checked against the sources it came with
(numbers no excerpt carries are removed) and its abstention decided (no relevant source,
or the prompt's fixed reply). Many questions are answered as concurrent ``aquery``-style
calls through the same query engine, so in either LLM mode whatever is in flight at once
reaches vLLM together and is batched; each answer is the one a single query would get.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rag_app.errors import RagAppError
from rag_app.pipelines.citations import check_citations
from rag_app.prompts import ABSTAIN_ANSWER

if TYPE_CHECKING:
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import NodeWithScore

    from rag_app.config import RagConfig


@dataclass
class Answer:
    """An answer with the sources it was given (best first, numbered from 1 as cited)."""

    question: str
    answer: str
    sources: list[NodeWithScore] = field(default_factory=list)
    citations: list[int] = field(default_factory=list)
    abstained: bool = False
    # Seconds, from the question: "retrieve" (sources found) and "total" (answer complete);
    # a stream adds "first_token".
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why this question of a batch got no answer


def is_abstention(answer: str) -> bool:
    """Whether an answer says the documents do not answer (the prompt's fixed reply)."""
    return answer.strip().lower().startswith(ABSTAIN_ANSWER.lower().rstrip("."))


def finish_answer(
    question: str,
    text: str,
    sources: Sequence[NodeWithScore],
    timings: dict[str, float] | None = None,
) -> Answer:
    """The answer as it may be shown: citations to no source removed and listed, and
    whether it abstained. Every path that produces an answer ends here."""
    checked, cited = check_citations(text.strip(), len(sources))
    abstained = not sources or is_abstention(checked)
    return Answer(question, checked, list(sources), cited, abstained, dict(timings or {}))


def check_question(question: str, cfg: RagConfig) -> str:
    """The question, stripped; an empty or over-long one is a one-line error, raised
    before any model is loaded or any search runs."""
    text = question.strip()
    if not text:
        raise RagAppError("the question is empty: ask something")
    if any("\ud800" <= char <= "\udfff" for char in text):  # undecodable bytes (argv, a file)
        raise RagAppError("the question is not valid text (bytes that are not UTF-8): retype it")
    limit = cfg.retrieval.max_question_chars
    if len(text) > limit:
        raise RagAppError(
            f"the question is {len(text)} characters long, over "
            f"retrieval.max_question_chars = {limit} (shorten it, or raise the setting)"
        )
    return text


async def aanswer(engine: RetrieverQueryEngine, question: str) -> Answer:
    """Answer one question through the engine's own async path (retrieve, then the
    grounded synthesizer), timing each stage."""
    from llama_index.core.schema import QueryBundle

    started = time.perf_counter()
    bundle = QueryBundle(question)
    nodes = await engine.aretrieve(bundle)
    retrieved = time.perf_counter() - started
    response = await engine.asynthesize(bundle, nodes)
    timings = {"retrieve": retrieved, "total": time.perf_counter() - started}
    return finish_answer(question, str(response), response.source_nodes, timings)


async def astream_answer(
    engine: RetrieverQueryEngine, question: str
) -> AsyncGenerator[str | Answer, None]:
    """Answer one question as it is generated: the tokens, then the finished
    :class:`Answer` (timings "retrieve", "first_token", "total").

    ``engine`` is built with ``streaming=True``. Closing the generator early (a reader
    that went away) aborts the request in the generator; so does cancelling its task.
    """
    from llama_index.core.schema import QueryBundle

    started = time.perf_counter()
    bundle = QueryBundle(question)
    nodes = await engine.aretrieve(bundle)
    timings = {"retrieve": time.perf_counter() - started}
    response = await engine.asynthesize(bundle, nodes)
    parts: list[str] = []
    tokens = _response_tokens(response)
    try:
        async for token in tokens:
            if not parts:
                timings["first_token"] = time.perf_counter() - started
            parts.append(token)
            yield token
    finally:
        await tokens.aclose()  # at once, not when garbage is collected
    timings["total"] = time.perf_counter() - started
    yield finish_answer(question, "".join(parts), response.source_nodes, timings)


async def _response_tokens(response: Any) -> AsyncGenerator[str, None]:
    """The text of a synthesizer's response as it arrives, whatever kind it is (a stream
    from the LLM, the fixed abstention, or a whole answer)."""
    from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse

    if isinstance(response, AsyncStreamingResponse):
        stream = response.async_response_gen()
        try:
            async for token in stream:
                yield token
        finally:
            await stream.aclose()
    elif isinstance(response, StreamingResponse) and response.response_gen is not None:
        for token in response.response_gen:
            yield token
    else:
        yield str(response)


async def aanswer_many(
    engine: RetrieverQueryEngine, questions: Sequence[str], *, concurrency: int = 16
) -> list[Answer]:
    """Answer ``questions`` concurrently (at most ``concurrency`` in flight), in order.
    A question whose answer fails (the server went away, say) gets ``error`` set; the
    others are answered."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(question: str) -> Answer:
        async with gate:
            try:
                return await aanswer(engine, question)
            except RagAppError as exc:
                return Answer(question, "", error=str(exc))

    return list(await asyncio.gather(*(one(question) for question in questions)))


def answer_many(
    engine: RetrieverQueryEngine, questions: Sequence[str], *, concurrency: int = 16
) -> list[Answer]:
    """:func:`aanswer_many` for synchronous callers (not from inside an event loop)."""
    return asyncio.run(aanswer_many(engine, questions, concurrency=concurrency))


def source_dicts(sources: Sequence[NodeWithScore]) -> list[dict[str, Any]]:
    """Sources as shown to users and clients: number (as cited), source, title, score, text."""
    from rag_app.pipelines.query import node_source

    return [
        {
            "number": number,
            "source": node_source(node),
            "title": node.node.metadata.get("title"),
            "score": None if node.score is None else round(float(node.score), 4),
            "text": node.node.get_content(),
        }
        for number, node in enumerate(sources, 1)
    ]


def answer_dict(answer: Answer) -> dict[str, Any]:
    """An answer as one JSON object (``rag-app query --json``, the HTTP service)."""
    result: dict[str, Any] = {
        "question": answer.question,
        "answer": answer.answer,
        "abstained": answer.abstained,
        "citations": answer.citations,
        "sources": source_dicts(answer.sources),
    }
    if answer.timings:
        result["timings"] = {name: round(value, 4) for name, value in answer.timings.items()}
    if answer.error is not None:
        result["error"] = answer.error
    return result
