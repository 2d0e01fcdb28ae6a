"""Documents from files: Markdown, text, HTML, PDF and Word, one ``Document`` per file.

Each document's id is its path relative to the ingested folder, so ingesting the same
folder again from anywhere addresses the same rows in Milvus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import frontmatter
from bs4 import BeautifulSoup
from charset_normalizer import from_bytes
from llama_index.core import Document

# Metadata the LLM sees with each chunk; everything else stays out of prompts and
# embeddings (a path or a timestamp does not describe the text).
LLM_METADATA = ("source", "title")
_BLOCK_TAGS = ["p", "div", "br", "li", "tr", "pre", "table", "section", "article", "blockquote"]
_BLOCK_TAGS += [f"h{level}" for level in range(1, 7)]
_BOILERPLATE_TAGS = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form")


class UnreadableFile(Exception):
    """A file that is skipped, with the reason reported to the user."""


@dataclass(frozen=True)
class Parsed:
    text: str
    title: str | None = None


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise UnreadableFile("binary content, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    western = _as_western(data)
    if western is not None:
        return western
    guess = from_bytes(data).best()
    if guess is None:
        raise UnreadableFile("not valid text in any known encoding")
    return str(guess)


def _as_western(data: bytes) -> str | None:
    """The text as Windows-1252 (a superset of Latin-1), if it reads as a Western language.

    charset-normalizer often takes short French or German text for a Baltic or Central
    European code page (è becomes č). Western text has a few accented letters among plain
    ones; Cyrillic or Greek bytes read as Windows-1252 are accented letters almost only.
    """
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    letters = [char for char in text if char.isalpha()]
    accented = sum(1 for char in letters if ord(char) > 127)
    return text if letters and accented / len(letters) < 0.3 else None


def _first_heading(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def parse_markdown(path: Path) -> Parsed:
    post = frontmatter.loads(_decode(path.read_bytes()))
    title = post.metadata.get("title")
    return Parsed(post.content, str(title) if title else _first_heading(post.content))


def parse_text(path: Path) -> Parsed:
    return Parsed(_decode(path.read_bytes()))


def parse_html(path: Path) -> Parsed:
    soup = BeautifulSoup(_decode(path.read_bytes()), "html.parser")
    title = soup.title.get_text(strip=True) if soup.title else None
    for tag in soup(_BOILERPLATE_TAGS):
        tag.decompose()
    body = soup.find("main") or soup.find("article") or soup.body or soup
    for block in body.find_all(_BLOCK_TAGS):
        block.insert_after("\n")
    lines = (" ".join(line.split()) for line in body.get_text().splitlines())
    return Parsed("\n".join(line for line in lines if line), title or None)


def parse_pdf(path: Path) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, ValueError, KeyError) as exc:
        raise UnreadableFile(f"not a readable PDF ({exc})") from None
    title = reader.metadata.title if reader.metadata else None
    return Parsed("\n\n".join(pages), title or None)


def parse_docx(path: Path) -> Parsed:
    import zipfile

    import docx2txt

    try:
        return Parsed(docx2txt.process(str(path)))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise UnreadableFile(f"not a readable Word document ({exc})") from None


PARSERS: dict[str, tuple[str, Callable[[Path], Parsed]]] = {
    ".md": ("markdown", parse_markdown),
    ".markdown": ("markdown", parse_markdown),
    ".txt": ("text", parse_text),
    ".html": ("html", parse_html),
    ".htm": ("html", parse_html),
    ".pdf": ("pdf", parse_pdf),
    ".docx": ("docx", parse_docx),
}


def discover(root: Path) -> list[Path]:
    """Supported files under ``root`` (or ``root`` itself), sorted, hidden ones left out."""
    if root.is_file():
        return [root] if root.suffix.lower() in PARSERS else []
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in PARSERS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def load_document(path: Path, root: Path) -> Document:
    """Read one file into a ``Document``; raises :class:`UnreadableFile` with the reason."""
    doc_type, parse = PARSERS[path.suffix.lower()]
    try:
        parsed = parse(path)
        stat = path.stat()
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    if not parsed.text.strip():
        raise UnreadableFile("no text in it")
    source = path.name if root.is_file() else path.relative_to(root).as_posix()
    metadata = {
        "source": source,
        "title": parsed.title or path.stem,
        "doc_type": doc_type,
        "modified": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds"),
    }
    excluded = [key for key in metadata if key not in LLM_METADATA]
    return Document(
        id_=source,
        text=parsed.text,
        metadata=metadata,
        excluded_llm_metadata_keys=excluded,
        excluded_embed_metadata_keys=list(metadata),
    )


def load_documents(
    files: list[Path], root: Path
) -> Iterator[tuple[Path, Document | UnreadableFile]]:
    """Each file with its document, or with the reason it could not be read."""
    for path in files:
        try:
            yield path, load_document(path, root)
        except UnreadableFile as exc:
            yield path, exc
