"""Chunking: the configured splitter, section headings as metadata, and no chunk longer
than the embedding model reads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rag_app import RagAppError
from rag_app.components.chunking import chunk_documents
from rag_app.components.embedding import token_counter
from rag_app.components.readers import load_documents

GUIDE = """---
title: Index guide
---
# Index guide

Milvus builds indexes on vector fields. An index trades memory and build time for search
speed, and each index type has its own parameters. Pick one per vector field.

## Building HNSW

Set M and efConstruction when building. M is the number of neighbours each node keeps in
the graph; efConstruction is how many candidates are considered while linking a new node.

```bash
# this is a shell comment, not a heading
pip install pymilvus
```

Still part of the HNSW section after the code block: larger values of either parameter
raise recall and build time alike, so tune them together on a sample of your data.

## Searching

Pass ef at search time. It bounds the candidate list the search keeps, so it must be at
least top_k; raising it improves recall at the cost of latency.
"""


def read(tmp_path: Path, name: str, text: str):
    (tmp_path / name).write_text(text)
    ((_, document),) = list(load_documents([tmp_path / name], tmp_path))
    return document


def test_markdown_chunks_carry_the_section_path_of_the_section_holding_most_of_their_text(
    small_cfg, tmp_path
):
    small_cfg.chunking.chunk_size, small_cfg.chunking.chunk_overlap = 200, 0
    guide = read(tmp_path, "guide.md", GUIDE)
    chunks = chunk_documents(small_cfg, [guide])
    by_text = {
        chunk.get_content(): chunk.metadata.get("section", "").removeprefix("Index guide > ")
        for chunk in chunks
    }
    assert {c.metadata["section"] for c in chunks} == {
        "Index guide", "Index guide > Building HNSW", "Index guide > Searching"
    }  # fmt: skip
    checked = set()
    for text, section in by_text.items():
        if "\n## Searching" in text:  # spans two sections: the one with more of the text
            before, after = text.split("\n## Searching")
            assert section == ("Searching" if len(after) > len(before) else "Building HNSW")
            checked.add("spanning")
        elif "shell comment" in text or "Still part of the HNSW section" in text:
            assert section == "Building HNSW", text  # a "#" line in a code block is no heading
            checked.add("code block")
        elif "candidate list the search keeps" in text or "improves recall" in text:
            assert section == "Searching", text
            checked.add("last section")
    assert checked == {"spanning", "code block", "last section"}  # every case was seen
    assert [chunk.node_id for chunk in chunks] == [f"guide.md#{n}" for n in range(len(chunks))]
    assert all(chunk.metadata["title"] == "Index guide" for chunk in chunks)


def test_a_repeated_passage_gets_the_section_of_its_own_copy(small_cfg, tmp_path):
    small_cfg.chunking.chunk_size, small_cfg.chunking.chunk_overlap = 64, 0
    same = "The same sentence appears under both headings."
    guide = read(tmp_path, "twice.md", f"# First\n\n{same}\n\n# Second\n\n{same}\n")
    sections = [c.metadata["section"] for c in chunk_documents(small_cfg, [guide])]
    assert sections[-1] == "Second" and sections[0] == "First"


def test_chunks_respect_the_configured_character_size(small_cfg, tmp_path):
    page = read(tmp_path, "page.txt", "Partitions split a collection. " * 200)
    chunks = chunk_documents(small_cfg, [page])
    assert len(chunks) > 5
    assert all(len(chunk.get_content()) <= small_cfg.chunking.chunk_size for chunk in chunks)


def test_chunks_longer_than_the_model_reads_are_split_further_with_a_warning(
    small_cfg, embed_model, tmp_path, caplog
):
    count, limit = token_counter(embed_model)
    small_cfg.chunking.chunk_size, small_cfg.chunking.chunk_overlap = 4000, 0
    words = " ".join(f"word{n}" for n in range(700))  # ~4000 characters, ~1400 tokens
    page = read(tmp_path, "long.txt", words)
    with caplog.at_level(logging.WARNING, logger="rag_app"):
        chunks = chunk_documents(small_cfg, [page], token_counter(embed_model))
    assert len(chunks) > 1
    assert all(count(chunk.get_content()) <= limit for chunk in chunks)
    assert " ".join(chunk.get_content() for chunk in chunks).split() == words.split()
    assert "longer than the embedding model's" in caplog.text


def test_text_denser_in_tokens_than_its_average_is_split_until_every_piece_fits(
    small_cfg, tmp_path
):
    """Pieces are sized in characters from the chunk's average characters per token; where
    a part is denser (numbers, code), a piece can still hold too many tokens: it is split
    again, since the model (or an embedding server, which refuses it) reads only ``limit``."""

    def count(text: str) -> int:  # a digit costs a token more than its share of 4 characters
        return len(text) // 4 + sum(ch.isdigit() for ch in text)

    limit = 60
    small_cfg.chunking.chunk_size, small_cfg.chunking.chunk_overlap = 4000, 0
    text = "lorem ipsum dolor sit amet " * 80 + "7 77 777 " * 60  # sparse, then dense
    page = read(tmp_path, "mixed.txt", text)
    chunks = chunk_documents(small_cfg, [page], (count, limit))
    assert max(count(chunk.get_content()) for chunk in chunks) <= limit
    assert " ".join(chunk.get_content() for chunk in chunks).split() == text.split()


def test_token_splitter_sizes_chunks_in_model_tokens(small_cfg, embed_model, tmp_path):
    small_cfg.chunking.splitter = "token"
    small_cfg.chunking.chunk_size, small_cfg.chunking.chunk_overlap = 64, 8
    page = read(tmp_path, "page.txt", "Consistency levels trade freshness for speed. " * 60)
    tokens = token_counter(embed_model)
    chunks = chunk_documents(small_cfg, [page], tokens)
    assert len(chunks) > 5
    assert all(tokens[0](chunk.get_content()) <= 64 for chunk in chunks)
    assert max(len(chunk.get_content()) for chunk in chunks) > 150  # tokens, not characters


def test_token_splitter_without_a_tokenizer_is_a_one_line_error(small_cfg, tmp_path):
    small_cfg.chunking.splitter = "token"
    page = read(tmp_path, "page.txt", "Some text. " * 10)
    with pytest.raises(RagAppError, match="needs an embedding model with a tokenizer"):
        chunk_documents(small_cfg, [page], None)


def test_metadata_is_not_taken_out_of_the_chunk_size(small_cfg, tmp_path):
    """LlamaIndex's splitter subtracts the length of a node's metadata string from every
    chunk: a 314-character title left 115-character chunks of 512, and a title or path
    longer than the chunk size stopped the ingest ("Metadata length ... is longer")."""
    body = "Partitions split a collection into parts that are searched apart. " * 40
    for name, text in (
        ("titled.md", f"---\ntitle: {'T' * 314}\n---\n{body}"),
        (f"{'p' * 240}.md", f"# {'H' * 290}\n{body}"),
    ):
        (document,) = [read(tmp_path, name, text)]
        chunks = chunk_documents(small_cfg, [document])
        lengths = [len(chunk.get_content()) for chunk in chunks]
        assert max(lengths) > 400 and max(lengths) <= small_cfg.chunking.chunk_size
        assert chunks[0].metadata["title"] == document.metadata["title"]
