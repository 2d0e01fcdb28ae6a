"""Chunking: LlamaIndex's ``SentenceSplitter``, sized in characters (default) or tokens.

The recipe's ``RecursiveCharacterTextSplitter(512, 51)`` splits on paragraphs, then
sentences, then words, keeping chunks under 512 characters with 51 of overlap;
``SentenceSplitter`` does the same recursion when its "tokenizer" counts characters.
Chunk ids are ``<document id>#<n>``: stable, so a re-ingest replaces rows in place.
No chunk is longer than the embedding model reads: longer ones are split further, with a
warning, instead of being truncated silently by the model.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Callable, Sequence

from llama_index.core import Document
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, TextNode

from rag_app.components.context import (
    CONTEXT_KEY,
    SECTION_SEPARATOR,
    contextual_text,
    render_context,
)
from rag_app.components.readers import MAX_TITLE_CHARS, bounded
from rag_app.config import RagConfig
from rag_app.errors import RagAppError

log = logging.getLogger(__name__)
TokenCounter = tuple[Callable[[str], int], int]
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ #]*$", re.MULTILINE)
# Documents whose text marks headings with "#" lines: Markdown, and HTML as html_text renders it.
_SECTIONED = {"markdown", "html"}
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _chunk_id(index: int, document: BaseNode) -> str:
    return f"{document.node_id}#{index}"


def build_splitter(cfg: RagConfig, tokens: TokenCounter | None = None) -> SentenceSplitter:
    """The configured splitter; ``tokens`` (the embedding model's) is needed for 'token'."""
    if cfg.chunking.splitter == "token":
        if tokens is None:
            raise RagAppError(
                "chunking.splitter = 'token' needs an embedding model with a tokenizer "
                "(use chunking.splitter = 'sentence')"
            )
        count = tokens[0]
        tokenizer: Callable[[str], Sequence[object]] = lambda text: range(count(text))  # noqa: E731
    else:
        tokenizer = list  # one "token" per character
    return SentenceSplitter(
        chunk_size=cfg.chunking.chunk_size,
        chunk_overlap=cfg.chunking.chunk_overlap,
        tokenizer=tokenizer,
        include_metadata=False,  # chunk_documents gives each chunk its metadata
        include_prev_next_rel=False,
        id_func=_chunk_id,
    )


def _fit_to_model(
    nodes: list[BaseNode], tokens: TokenCounter, reserve: dict[str, int] | None = None
) -> list[BaseNode]:
    """Split chunks the embedding model would truncate into pieces it reads whole, leaving
    room for their document's longest context header (``reserve``: tokens per document)."""
    count, model_limit = tokens
    fitted: list[BaseNode] = []
    too_long = 0
    for node in nodes:
        text = node.get_content()
        n_tokens = count(text)
        limit = max(model_limit - (reserve or {}).get(node.ref_doc_id or "", 0), 16)
        if n_tokens <= limit:
            fitted.append(node)
            continue
        too_long += 1
        start = getattr(node, "start_char_idx", None) or 0
        for piece in _pieces_that_fit(text, n_tokens, count, limit):
            offset = text.find(piece)
            fitted.append(
                TextNode(
                    text=piece,
                    relationships=dict(node.relationships),
                    start_char_idx=start + max(offset, 0),
                    end_char_idx=start + max(offset, 0) + len(piece),
                )
            )
    if too_long:
        log.warning(
            "%d chunks were longer than the embedding model's %d tokens and were split "
            "further (lower chunking.chunk_size, or shorten chunking.context_template, to "
            "avoid this)",
            too_long,
            model_limit,
        )
    return fitted


def _pieces_that_fit(
    text: str, n_tokens: int, count: Callable[[str], int], limit: int
) -> list[str]:
    """``text`` split into pieces of at most ``limit`` tokens (down to 32 characters). Sizes
    are guessed in characters from the text's own characters per token, so a piece that
    still has too many tokens (denser text than the average) is split again."""
    size = max(32, int(len(text) * limit / max(n_tokens, 1) * 0.9))
    pieces: list[str] = []
    for piece in SentenceSplitter(chunk_size=size, chunk_overlap=0, tokenizer=list).split_text(
        text
    ):
        tokens = count(piece)
        if tokens <= limit or size <= 32 or len(piece) >= len(text):
            pieces.append(piece)
        else:
            pieces.extend(_pieces_that_fit(piece, tokens, count, limit))
    return pieces


def _sections(document: Document) -> tuple[list[int], list[str]]:
    """Offsets of a document's headings (not ``#`` lines in fenced code) and the section path
    each one starts: the titles of the headings above it and its own, ``"Guide > Install >
    On Linux"``. Markdown and HTML (whose headings :mod:`html_text` renders as ``#`` lines)."""
    if document.metadata.get("doc_type") not in _SECTIONED:
        return [], []
    text = document.text
    fences = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    matches = [m for m in _HEADING.finditer(text) if not any(a <= m.start() < b for a, b in fences)]
    paths: list[str] = []
    open_headings: list[tuple[int, str]] = []  # (level, title), outermost first
    for match in matches:
        level = len(match.group(1))
        while open_headings and open_headings[-1][0] >= level:
            open_headings.pop()
        open_headings.append((level, bounded(match.group(2))))
        path = SECTION_SEPARATOR.join(title for _, title in open_headings)
        paths.append(bounded(path, 2 * MAX_TITLE_CHARS))
    return [m.start() for m in matches], paths


def _context_section(section: str | None, title: str | None) -> str | None:
    """The section path as the context header shows it: without a first heading that only
    repeats the document's title (a Markdown page's ``# Title``)."""
    if not section or not title:
        return section
    first, _, rest = section.partition(SECTION_SEPARATOR)
    return (rest or None) if first == title else section


def _section_of(node: BaseNode, offsets: list[int], titles: list[str]) -> str | None:
    """The section path of the section holding most of a chunk's text (chunks may span two)."""
    start = getattr(node, "start_char_idx", None) or 0
    end = getattr(node, "end_char_idx", None) or start + len(node.get_content())
    first = bisect.bisect_right(offsets, start) - 1
    last = bisect.bisect_left(offsets, end) - 1
    best, best_share = None, 0
    for at in range(max(first, 0), last + 1):
        share = min(end, offsets[at + 1] if at + 1 < len(offsets) else end) - max(
            start, offsets[at]
        )
        if share > best_share:
            best, best_share = titles[at], share
    return best


def _header(cfg: RagConfig, doc: Document, section: str | None) -> str:
    """A chunk's context header: the template rendered with its document's metadata."""
    values = {**doc.metadata, "section": _context_section(section, doc.metadata.get("title"))}
    return render_context(cfg.chunking.context_template, values)


def _longest_header(
    cfg: RagConfig, doc: Document, paths: list[str], count: Callable[[str], int]
) -> int:
    """Tokens of the longest header a chunk of ``doc`` can get, with the blank line after it."""
    if not cfg.chunking.context_template:
        return 0
    headers = {_header(cfg, doc, section) for section in [None, *paths]}
    return max((count(header + "\n\n") for header in headers if header), default=0)


def embed_text(node: BaseNode) -> str:
    """What is embedded for a chunk, and what the collection's BM25 field indexes: its
    context header (``chunking.context_template``, rendered at chunking) and its text."""
    return contextual_text(node.get_content(), node.metadata.get(CONTEXT_KEY))


def chunk_documents(
    cfg: RagConfig, documents: Sequence[Document], tokens: TokenCounter | None = None
) -> list[BaseNode]:
    """Split documents into chunks; each carries its document's metadata, its section path
    and the context header that :func:`embed_text` puts before its text.

    Splitting ignores metadata (the text, not text plus a path, is what is 512 characters
    long). ``tokens`` (a counter and the embedding model's limit) guards against chunks
    the model would truncate.
    """
    # SentenceSplitter takes the length of a node's metadata string out of every chunk
    # (split_text_metadata_aware), whatever include_metadata says: a 314-character title
    # left 115 characters of text. The splitter sees the documents without metadata; each
    # chunk gets its document's metadata back below.
    bare = [
        doc.model_copy(update={"excluded_llm_metadata_keys": list(doc.metadata),
                               "excluded_embed_metadata_keys": list(doc.metadata)})
        for doc in documents
    ]  # fmt: skip
    nodes = build_splitter(cfg, tokens).get_nodes_from_documents(bare)
    by_id = {doc.doc_id: doc for doc in documents}
    sections = {doc.doc_id: _sections(doc) for doc in documents}
    if tokens is not None:
        reserve = {
            doc.doc_id: _longest_header(cfg, doc, sections[doc.doc_id][1], tokens[0])
            for doc in documents
        }
        nodes = _fit_to_model(nodes, tokens, reserve)
    numbering: dict[str, int] = {}
    cursor: dict[str, int] = {}
    for node in nodes:
        doc_id = node.ref_doc_id or ""
        doc = by_id[doc_id]
        node.id_ = f"{doc_id}#{numbering.setdefault(doc_id, 0)}"
        numbering[doc_id] += 1
        # Chunks come in document order; searching from the previous chunk's start finds
        # the right copy of text that a document repeats (the splitter searches from 0).
        text = node.get_content()
        at = doc.text.find(text, cursor.get(doc_id, 0))
        if at >= 0 and isinstance(node, TextNode):
            node.start_char_idx, node.end_char_idx = at, at + len(text)
            cursor[doc_id] = at + 1
        node.metadata = dict(doc.metadata)
        section = _section_of(node, *sections[doc_id])
        if section is not None:
            node.metadata["section"] = section
        header = _header(cfg, doc, section)
        if header:
            node.metadata[CONTEXT_KEY] = header
        # Embedded: the header and the text (see embed_text); the LLM sees the text with the
        # document's source and title, as before; neither sees the header in metadata form.
        node.excluded_embed_metadata_keys = list(node.metadata)
        node.excluded_llm_metadata_keys = [
            key
            for key in node.metadata
            if key in doc.excluded_llm_metadata_keys or key in ("section", CONTEXT_KEY)
        ]
    return nodes
