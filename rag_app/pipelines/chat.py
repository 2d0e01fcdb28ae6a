"""Multi-turn chat over the documents: LlamaIndex's condense-plus-context chat engine.

Each turn, the follow-up question is condensed with the conversation into a standalone
question, which is retrieved for with the configured retriever (modes, filters,
postprocessors); the answer comes from those excerpts, with their sources on the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import suppress

from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONDENSE_PROMPT_TEMPLATE
from llama_index.core.llms import LLM
from llama_index.core.memory import Memory
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.vector_stores.types import MetadataFilters

from rag_app.components.llm import build_llm
from rag_app.config import RagConfig
from rag_app.pipelines.answer import Answer, finish_answer
from rag_app.pipelines.query import configured_retriever
from rag_app.prompts import (
    CHAT_CONTEXT_PROMPT,
    CHAT_CONTEXT_REFINE_PROMPT,
    CHAT_SYSTEM_PROMPT,
    quote_as_data,
    quoting_template,
)


class QuotedMemory(Memory):
    """The conversation as the prompts replay it: every message's text neutralised by
    :func:`rag_app.prompts.quote_as_data` (an answer may repeat an excerpt's control tokens,
    and the history is sent as messages, outside any template variable)."""

    async def aput(self, message: ChatMessage) -> None:
        await super().aput(_quoted(message))

    async def aput_messages(self, messages: list[ChatMessage]) -> None:
        await super().aput_messages([_quoted(message) for message in messages])

    async def aset(self, messages: list[ChatMessage]) -> None:
        await super().aset([_quoted(message) for message in messages])


def _quoted(message: ChatMessage) -> ChatMessage:
    if not isinstance(message.content, str):
        return message
    quoted = quote_as_data(message.content)
    if quoted == message.content:
        return message
    return ChatMessage(
        role=message.role, content=quoted, additional_kwargs=message.additional_kwargs
    )


def build_chat_engine(
    cfg: RagConfig,
    *,
    index: VectorStoreIndex | None = None,
    llm: LLM | None = None,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
    retriever: BaseRetriever | None = None,
    embed_model: BaseEmbedding | None = None,
) -> CondensePlusContextChatEngine:
    """A chat engine with memory; ``engine.chat(message)`` answers with ``source_nodes``.

    ``retriever``: one already built (a service shares one per collection and options
    across its per-request engines); else one is built from ``top_k`` and ``filters``.
    Every prompt it sends carries document text only through ``quote_as_data``: the
    excerpts (``context_str``, ``context_msg``), the question and the conversation.
    """
    if retriever is None:
        retriever = configured_retriever(cfg, index, top_k=top_k, filters=filters,
                                         embed_model=embed_model)  # fmt: skip
    llm = llm or build_llm(cfg)
    return CondensePlusContextChatEngine.from_defaults(
        retriever=retriever,
        llm=llm,
        memory=QuotedMemory.from_defaults(token_limit=llm.metadata.context_window - 256),
        system_prompt=CHAT_SYSTEM_PROMPT,
        context_prompt=quoting_template(CHAT_CONTEXT_PROMPT),
        context_refine_prompt=quoting_template(CHAT_CONTEXT_REFINE_PROMPT),
        condense_prompt=quoting_template(DEFAULT_CONDENSE_PROMPT_TEMPLATE),
    )


async def astream_chat_answer(
    engine: CondensePlusContextChatEngine, message: str, history: Sequence[ChatMessage]
) -> AsyncGenerator[str | Answer, None]:
    """One turn of a conversation given whole (``history``: the turns before ``message``),
    as it is generated: the tokens, then the finished :class:`Answer` (timings "retrieve"
    (condensed and retrieved), "first_token", "total").

    The engine's memory is replaced by ``history``, so a stateless caller (the HTTP
    service) passes each request's conversation and builds one engine per request.
    Closing the generator early, or cancelling its task, aborts the generation.
    """
    started = time.perf_counter()
    response = await engine.astream_chat(message, chat_history=list(history))
    timings = {"retrieve": time.perf_counter() - started}
    # The engine generates in a task of its own that feeds the stream: stop it with us.
    writer = response.awrite_response_to_history_task
    parts: list[str] = []
    tokens = response.async_response_gen()
    try:
        async for token in tokens:
            if not parts:
                timings["first_token"] = time.perf_counter() - started
            parts.append(token)
            yield token
    finally:
        await tokens.aclose()
        if writer is not None and not writer.done():
            writer.cancel()
            with suppress(asyncio.CancelledError):
                await writer
    timings["total"] = time.perf_counter() - started
    yield finish_answer(message, "".join(parts), response.source_nodes, timings)
