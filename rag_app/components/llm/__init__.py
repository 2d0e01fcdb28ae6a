"""The generator: vLLM in-process (``local``) or a vLLM OpenAI-compatible server (``server``),
as a LlamaIndex ``LLM`` either way."""

from __future__ import annotations

from llama_index.core.llms import LLM

from rag_app.components.llm.local import AsyncEngineVllm, build_local
from rag_app.components.llm.server import VllmServerLLM, build_server
from rag_app.config import RagConfig

__all__ = ["AsyncEngineVllm", "VllmServerLLM", "build_llm"]


def build_llm(cfg: RagConfig) -> LLM:
    """The configured generator as a LlamaIndex ``LLM``.

    ``local`` starts a vLLM engine in a child process (tens of seconds, once); call
    ``close()`` on it when done. ``server`` only creates an HTTP client.
    """
    return build_local(cfg) if cfg.llm.mode == "local" else build_server(cfg)
