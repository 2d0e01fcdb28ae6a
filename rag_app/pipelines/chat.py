"""Multi-turn chat over the documents: LlamaIndex's condense-plus-context chat engine.

Each turn, the follow-up question is condensed with the conversation into a standalone
question, which is retrieved for with the configured retriever (modes, filters,
postprocessors); the answer comes from those excerpts, with their sources on the response.
"""

from __future__ import annotations

from llama_index.core import VectorStoreIndex
from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.llms import LLM
from llama_index.core.vector_stores.types import MetadataFilters

from rag_app.components.llm import build_llm
from rag_app.components.retrieval import build_retriever
from rag_app.config import RagConfig
from rag_app.pipelines.query import build_index
from rag_app.prompts import CHAT_CONTEXT_PROMPT, CHAT_CONTEXT_REFINE_PROMPT, CHAT_SYSTEM_PROMPT


def build_chat_engine(
    cfg: RagConfig,
    *,
    index: VectorStoreIndex | None = None,
    llm: LLM | None = None,
    top_k: int | None = None,
    filters: MetadataFilters | None = None,
) -> CondensePlusContextChatEngine:
    """A chat engine with memory; ``engine.chat(message)`` answers with ``source_nodes``."""
    index = index or build_index(cfg)
    llm = llm or build_llm(cfg)
    return CondensePlusContextChatEngine.from_defaults(
        retriever=build_retriever(cfg, index, top_k=top_k, filters=filters),
        llm=llm,
        system_prompt=CHAT_SYSTEM_PROMPT,
        context_prompt=CHAT_CONTEXT_PROMPT,
        context_refine_prompt=CHAT_CONTEXT_REFINE_PROMPT,
    )
