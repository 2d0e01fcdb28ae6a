"""Chunking: LlamaIndex's ``SentenceSplitter`` measured in characters, like the recipe.

The recipe's ``RecursiveCharacterTextSplitter(512, 51)`` splits on paragraphs, then
sentences, then words, keeping chunks under 512 characters with 51 of overlap;
``SentenceSplitter`` does the same recursion when its "tokenizer" counts characters.
Chunk ids are ``<document id>#<n>``: stable, so a re-ingest replaces rows in place.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core import Document
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


def chunk_documents(cfg: RagConfig, documents: Sequence[Document]) -> list[BaseNode]:
    """Split documents into chunks of at most ``chunk_size`` characters of text.

    Splitting ignores metadata (so the text, not text plus a path, is what is 512
    characters long); each chunk then carries its document's metadata and the same
    rules for which keys the embedding model and the LLM see.
    """
    nodes = build_splitter(cfg).get_nodes_from_documents(documents)
    by_id = {doc.doc_id: doc for doc in documents}
    for node in nodes:
        doc = by_id[node.ref_doc_id or ""]
        node.metadata = dict(doc.metadata)
        node.excluded_embed_metadata_keys = list(doc.excluded_embed_metadata_keys)
        node.excluded_llm_metadata_keys = list(doc.excluded_llm_metadata_keys)
    return nodes
