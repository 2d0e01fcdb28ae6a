"""rag_app: retrieval-augmented generation on LlamaIndex with Milvus, BGE and vLLM.

The factory functions return plain LlamaIndex objects built from ``config.toml``, so any
LlamaIndex application can use them without knowing about rag_app's configuration.
"""

from rag_app.components.embedding import build_embed_model
from rag_app.components.llm import AsyncEngineVllm, build_llm
from rag_app.components.retrieval import build_retriever, parse_filters
from rag_app.components.vector_store import build_storage_context, build_vector_store
from rag_app.config import RagConfig, load_config
from rag_app.errors import RagAppError
from rag_app.pipelines.chat import build_chat_engine
from rag_app.pipelines.ingest import IngestReport, ingest_path
from rag_app.pipelines.query import build_index, build_query_engine

__all__ = [
    "AsyncEngineVllm",
    "IngestReport",
    "RagAppError",
    "RagConfig",
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
