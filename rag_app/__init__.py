"""rag_app: retrieval-augmented generation on LlamaIndex with Milvus, BGE and vLLM.

The factory functions return plain LlamaIndex objects built from ``config.toml``, so any
LlamaIndex application can use them without knowing about rag_app's configuration.

Names are imported on first use: ``import rag_app`` (and the ``rag-app`` CLI, which imports
``rag_app.errors``) must not load torch, transformers or vLLM before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngineVllm": "rag_app.components.llm.local",
    "IngestReport": "rag_app.pipelines.ingest",
    "RagAppError": "rag_app.errors",
    "RagConfig": "rag_app.config",
    "Answer": "rag_app.pipelines.answer",
    "answer_many": "rag_app.pipelines.answer",
    "build_chat_engine": "rag_app.pipelines.chat",
    "build_embed_model": "rag_app.components.embedding",
    "build_index": "rag_app.pipelines.query",
    "build_llm": "rag_app.components.llm",
    "build_query_engine": "rag_app.pipelines.query",
    "build_retriever": "rag_app.components.retrieval",
    "build_storage_context": "rag_app.components.vector_store",
    "build_vector_store": "rag_app.components.vector_store",
    "ingest_path": "rag_app.pipelines.ingest",
    "load_config": "rag_app.config",
    "parse_filters": "rag_app.components.retrieval",
}
__all__ = [
    "Answer",
    "AsyncEngineVllm",
    "IngestReport",
    "RagAppError",
    "RagConfig",
    "answer_many",
    "build_chat_engine",
    "build_embed_model",
    "build_index",
    "build_llm",
    "build_query_engine",
    "build_retriever",
    "build_storage_context",
    "build_vector_store",
    "ingest_path",
    "load_config",
    "parse_filters",
]

if TYPE_CHECKING:
    from rag_app.components.embedding import build_embed_model
    from rag_app.components.llm import build_llm
    from rag_app.components.llm.local import AsyncEngineVllm
    from rag_app.components.retrieval import build_retriever, parse_filters
    from rag_app.components.vector_store import build_storage_context, build_vector_store
    from rag_app.config import RagConfig, load_config
    from rag_app.errors import RagAppError
    from rag_app.pipelines.answer import Answer, answer_many
    from rag_app.pipelines.chat import build_chat_engine
    from rag_app.pipelines.ingest import IngestReport, ingest_path
    from rag_app.pipelines.query import build_index, build_query_engine


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rag_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
