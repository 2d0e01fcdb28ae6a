"""Documents from files: Markdown, text, HTML, PDF and Word, one ``Document`` per file.

Each document's id is its path relative to the ingested folder, so ingesting the same
folder again from anywhere addresses the same rows in Milvus.

A file is read once, into memory, and parsed from its bytes. Whatever goes wrong with one
file (it vanished, it is not readable, a symbolic link out of the folder, a parser's exception
of any kind) becomes that file's skip reason: :func:`load_documents` never stops on a file.
Metadata values are plain strings, bounded in length (a title is at most
:data:`MAX_TITLE_CHARS` characters), so no file can make its chunks unwritable.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from charset_normalizer import from_bytes
from llama_index.core import Document

from rag_app.components.globs import selected, unmatched
from rag_app.errors import first_line

# Metadata the LLM sees with each chunk; everything else stays out of prompts and
# embeddings (a path or a timestamp does not describe the text).
LLM_METADATA = ("source", "title")
MAX_TITLE_CHARS = 300  # titles and section headings, in metadata and prompts
# The most a Word document's XML parts may unpack to (a small zip can unpack to gigabytes).
MAX_DOCX_XML_BYTES = 256 * 2**20
# Byte-order marks, longest first (UTF-32-LE's begins with UTF-16-LE's).
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)


class UnreadableFile(Exception):
    """A file that is skipped, with the reason reported to the user.

    ``keep_stored``: whether the collection keeps what it holds for the file (a file that
    cannot be read now may be readable again); False for a file that is left out on purpose
    (a symbolic link out of the folder), whose rows are deleted like a deleted file's.
    """

    def __init__(self, reason: str, *, keep_stored: bool = True) -> None:
        super().__init__(reason)
        self.keep_stored = keep_stored


@dataclass(frozen=True)
class Parsed:
    text: str
    title: str | None = None


def _decode(data: bytes) -> str:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom) :].decode(encoding.removesuffix("-sig"))
            except UnicodeDecodeError:
                raise UnreadableFile(f"not valid {encoding.upper()} text") from None
    if b"\x00" in data[:8192]:
        raise UnreadableFile("binary content, not text")
    try:
        return data.decode("utf-8")
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


def bounded(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    """``text`` on one line (runs of whitespace as one space), cut to ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _plain_title(value: Any) -> str | None:
    """A front matter or PDF title as text, if it is a scalar (a list is not a title)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value).strip() or None
    return None


def _first_heading(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def parse_markdown(data: bytes) -> Parsed:
    import frontmatter

    text = _decode(data)
    try:
        post = frontmatter.loads(text)
    except Exception as exc:  # yaml's errors, a bad date's ValueError, a TOML or JSON error
        raise UnreadableFile(
            f"invalid front matter ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    title = _plain_title(post.metadata.get("title"))
    return Parsed(post.content, title or _first_heading(post.content))


def parse_text(data: bytes) -> Parsed:
    return Parsed(_decode(data))


def parse_html(data: bytes) -> Parsed:
    from rag_app.components.html_text import page_text

    text, title = page_text(_decode(data))
    return Parsed(text, title)


def parse_pdf(data: bytes) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
        info = reader.metadata
        title = _plain_title(info.title) if info is not None and info.title else None
    except (PdfReadError, ValueError, KeyError) as exc:
        raise UnreadableFile(f"not a readable PDF ({first_line(exc)})") from None
    return Parsed("\n\n".join(pages), title)


def parse_docx(data: bytes) -> Parsed:
    import zipfile
    from xml.etree.ElementTree import ParseError

    import docx2txt

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(i.file_size for i in archive.infolist() if i.filename.endswith(".xml"))
        if unpacked > MAX_DOCX_XML_BYTES:
            raise UnreadableFile(
                f"not a readable Word document (its XML unpacks to {unpacked / 2**20:.0f} MB, "
                f"over {MAX_DOCX_XML_BYTES / 2**20:.0f} MB)"
            )
        return Parsed(docx2txt.process(io.BytesIO(data)))
    except (zipfile.BadZipFile, KeyError, ParseError) as exc:
        raise UnreadableFile(f"not a readable Word document ({first_line(exc)})") from None


PARSERS: dict[str, tuple[str, Callable[[bytes], Parsed]]] = {
    ".md": ("markdown", parse_markdown),
    ".markdown": ("markdown", parse_markdown),
    ".txt": ("text", parse_text),
    ".html": ("html", parse_html),
    ".htm": ("html", parse_html),
    ".pdf": ("pdf", parse_pdf),
    ".docx": ("docx", parse_docx),
}


def _visible_files(root: Path) -> list[Path]:
    """Every file under the folder ``root``, sorted, hidden ones (any path part starting
    with ``.``) left out; symbolically linked folders are not followed."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def discover(root: Path) -> list[Path]:
    """Supported files under ``root`` (or ``root`` itself), sorted, hidden ones left out.
    Symbolically linked folders are not followed; linked files are listed (and checked by
    :func:`load_document`)."""
    if root.is_file():
        return [root] if root.suffix.lower() in PARSERS else []
    return [p for p in _visible_files(root) if p.suffix.lower() in PARSERS]


@dataclass(frozen=True)
class Selection:
    """The discovered files that ``ingestion.include``/``exclude`` keep, how many they left
    out, and the globs that match no file of the folder at all (typos, most likely)."""

    files: list[Path]
    excluded: int = 0
    unmatched_include: list[str] = field(default_factory=list)
    unmatched_exclude: list[str] = field(default_factory=list)


def select_files(
    root: Path, files: list[Path], include: Sequence[str], exclude: Sequence[str]
) -> Selection:
    """The files of ``files`` (found by :func:`discover`) that are part of the folder by
    the globs. A single file named on its own is always kept: naming it is explicit. Globs
    are checked for matches against every visible file, supported or not, so an exclude
    of an asset folder (``_static/**``) is no typo even though nothing there is read."""
    if root.is_file() or not (include or exclude):
        return Selection(files)
    kept = [f for f in files if selected(document_id(f, root), include, exclude)]
    every = [p.relative_to(root).as_posix() for p in _visible_files(root)]
    return Selection(
        kept, len(files) - len(kept), unmatched(include, every), unmatched(exclude, every)
    )


def _read_bytes(path: Path, max_bytes: float) -> tuple[bytes, os.stat_result]:
    """The file's bytes and status, read through one descriptor: a file replaced by a pipe
    or a device after it was listed is refused, not read forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        status = os.fstat(fh.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise UnreadableFile("not a regular file")
        if status.st_size > max_bytes:
            size, limit = status.st_size / 2**20, max_bytes / 2**20
            raise UnreadableFile(f"{size:.1f} MB, over ingestion.max_file_mb = {limit:g}")
        return fh.read(), status


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a file that resolves outside the ingested folder (a symbolic link to
    /etc/passwd, say): its text would be stored and served to whoever asks."""
    target, folder = path.resolve(), root.resolve()
    if not target.is_relative_to(folder):
        raise UnreadableFile(
            f"a symbolic link to {target}, outside {folder} (set "
            "ingestion.follow_symlinks_outside = true to read such links)",
            keep_stored=False,
        )


def document_id(path: Path, root: Path) -> str:
    """The document id: the path relative to the ingested folder (the file name when a
    single file is ingested), with forward slashes."""
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def load_document(
    path: Path,
    root: Path,
    *,
    max_bytes: float = math.inf,
    follow_symlinks_outside: bool = False,
) -> Document:
    """Read one file into a ``Document``; raises :class:`UnreadableFile` with the reason
    (other exceptions are turned into reasons by :func:`load_documents`)."""
    source = document_id(path, root)
    try:
        source.encode("utf-8")
    except UnicodeEncodeError:
        raise UnreadableFile("its name is not valid UTF-8 (rename the file)") from None
    doc_type, parse = PARSERS[path.suffix.lower()]
    try:
        if not (root.is_file() or follow_symlinks_outside):
            _check_inside(path, root)
        data, status = _read_bytes(path, max_bytes)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or first_line(exc)) from None
    parsed = parse(data)
    if not parsed.text.strip():
        raise UnreadableFile("no text in it")
    metadata: dict[str, str] = {
        "source": source,
        "title": bounded(parsed.title or "") or bounded(path.stem) or source,
        "doc_type": doc_type,
        "modified": datetime.fromtimestamp(status.st_mtime, UTC).isoformat(timespec="seconds"),
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
    files: list[Path],
    root: Path,
    *,
    max_bytes: float = math.inf,
    follow_symlinks_outside: bool = False,
) -> Iterator[tuple[Path, Document | UnreadableFile]]:
    """Each file with its document, or with the reason it could not be read. Any exception
    while reading or parsing one file is that file's reason (its class and first line);
    the loop goes on with the next file."""
    for path in files:
        result: Document | UnreadableFile
        try:
            result = load_document(
                path, root, max_bytes=max_bytes, follow_symlinks_outside=follow_symlinks_outside
            )
        except UnreadableFile as exc:
            result = exc
        except OSError as exc:
            result = UnreadableFile(exc.strerror or first_line(exc))
        except Exception as exc:  # a parser's bug or a hostile file: this file's problem
            result = UnreadableFile(f"{type(exc).__name__}: {first_line(exc)}")
        yield path, result
