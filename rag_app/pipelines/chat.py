"""Multi-turn chat over the documents: LlamaIndex's condense-plus-context chat engine.

Each turn, the follow-up question is condensed with the conversation into a standalone
question, which is retrieved for with the configured retriever (modes, filters,
postprocessors); the answer comes from those excerpts, with their sources on the response.
"""

from __future__ import annotations

from llama_index.core import VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.chat_engine.condense_plus_context import DEFAULT_CONDENSE_PROMPT_TEMPLATE
from llama_index.core.llms import LLM
from llama_index.core.memory import Memory
from llama_index.core.vector_stores.types import MetadataFilters

from rag_app.components.llm import build_llm
from rag_app.components.retrieval import build_retriever
from rag_app.config import RagConfig
from rag_app.pipelines.query import build_index
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
) -> CondensePlusContextChatEngine:
    """A chat engine with memory; ``engine.chat(message)`` answers with ``source_nodes``.

    Every prompt it sends carries document text only through ``quote_as_data``: the
    excerpts (``context_str``, ``context_msg``), the question and the conversation."""
    index = index or build_index(cfg)
    llm = llm or build_llm(cfg)
    return CondensePlusContextChatEngine.from_defaults(
        retriever=build_retriever(cfg, index, top_k=top_k, filters=filters),
        llm=llm,
        memory=QuotedMemory.from_defaults(token_limit=llm.metadata.context_window - 256),
        system_prompt=CHAT_SYSTEM_PROMPT,
        context_prompt=quoting_template(CHAT_CONTEXT_PROMPT),
        context_refine_prompt=quoting_template(CHAT_CONTEXT_REFINE_PROMPT),
        condense_prompt=quoting_template(DEFAULT_CONDENSE_PROMPT_TEMPLATE),
    )
