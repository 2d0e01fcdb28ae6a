"""Chunking: LlamaIndex's ``SentenceSplitter`` measured in characters, like the recipe.

The recipe's ``RecursiveCharacterTextSplitter(512, 51)`` splits on paragraphs, then
sentences, then words, keeping chunks under 512 characters with 51 of overlap;
``SentenceSplitter`` does the same recursion when its "tokenizer" counts characters.
Chunk ids are ``<document id>#<n>``: stable, so a re-ingest replaces rows in place.
"""

from __future__ import annotations

from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode

from rag_app.config import RagConfig


def _chunk_id(index: int, document: BaseNode) -> str:
    return f"{document.node_id}#{index}"


def build_splitter(cfg: RagConfig) -> SentenceSplitter:
    return SentenceSplitter(
        chunk_size=cfg.chunking.chunk_size,
        chunk_overlap=cfg.chunking.chunk_overlap,
        tokenizer=list,  # one "token" per character
        include_metadata=False,  # metadata is not counted against the chunk size
        include_prev_next_rel=False,
        id_func=_chunk_id,
    )
