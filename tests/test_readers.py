"""Files to documents: each format's text and metadata, and the reasons files are skipped."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from rag_app.components.readers import UnreadableFile, discover, load_document, load_documents


def make_pdf(path: Path, text: str, title: str) -> Path:
    """A minimal, valid one-page PDF with ``text`` in Helvetica."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Title (%s) >>" % title.encode(),
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(out))
    return path


def make_docx(path: Path, paragraphs: list[str]) -> Path:
    """A minimal Word document: the parts docx2txt reads."""
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    ns = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
            'content-types"><Override PartName="/word/document.xml" ContentType="application/'
            'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
        )
        archive.writestr(
            "word/document.xml", f"<w:document {ns}><w:body>{body}</w:body></w:document>"
        )
    return path


def test_pdf_text_and_title(tmp_path):
    pdf = make_pdf(tmp_path / "guide.pdf", "Milvus supports HNSW indexes.", "Index Guide")
    doc = load_document(pdf, tmp_path)
    assert "Milvus supports HNSW indexes." in doc.text
    assert doc.metadata["title"] == "Index Guide"
    assert (doc.metadata["doc_type"], doc.doc_id) == ("pdf", "guide.pdf")


def test_word_document_text(tmp_path):
    docx = make_docx(tmp_path / "notes.docx", ["First paragraph.", "Second paragraph."])
    doc = load_document(docx, tmp_path)
    assert "First paragraph." in doc.text and "Second paragraph." in doc.text
    assert (doc.metadata["doc_type"], doc.metadata["title"]) == ("docx", "notes")


def test_markdown_front_matter_title_is_metadata_not_text(tmp_path):
    (tmp_path / "sub").mkdir()
    page = tmp_path / "sub" / "page.md"
    page.write_text("---\nid: page.md\ntitle: In-memory Index\n---\n\n# Heading\nBody text.")
    doc = load_document(page, tmp_path)
    assert doc.text.startswith("# Heading") and "id: page.md" not in doc.text
    assert doc.metadata["title"] == "In-memory Index"
    assert doc.doc_id == doc.metadata["source"] == "sub/page.md"
    assert set(doc.excluded_embed_metadata_keys) == set(doc.metadata)
    assert set(doc.metadata) - set(doc.excluded_llm_metadata_keys) == {"source", "title"}


def test_markdown_without_front_matter_takes_its_first_heading(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Intro line\n# Real Title\ntext")
    assert load_document(page, tmp_path).metadata["title"] == "Real Title"


def test_discover_skips_hidden_and_unsupported_files(tmp_path):
    for name in ("a.md", "b.HTML", "c.json", ".hidden/d.md", "e/f.txt", "g.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in discover(tmp_path)] == [
        "a.md",
        "b.HTML",
        "e/f.txt",
    ]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bin.txt", b"\x7fELF\x00\x00\x01", "binary content"),
        ("blank.md", b"  \n\n", "no text"),
        ("bad.docx", b"not a zip", "not a readable Word document"),
    ],
)
def test_unreadable_files_raise_with_a_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableFile, match=reason):
        load_document(path, tmp_path)


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Le café crème est servi à la terrasse. Déjà vu, dit-il.", "latin-1"),
        ("Die Größe des Indexes hängt von der Anzahl der Vektoren ab.", "cp1252"),
        ("Привет, как дела? Это тест кодировки для индекса.", "cp1251"),
    ],
)
def test_legacy_encodings_are_decoded_to_the_right_characters(tmp_path, text, encoding):
    path = tmp_path / "legacy.txt"
    path.write_bytes(text.encode(encoding))
    assert load_document(path, tmp_path).text == text


# --- hostile and careless files: every failure is one file's listed reason ------------------

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")


def read_all(root: Path, **options) -> dict[str, str]:
    """Every discovered file's outcome: its text, or ``"skipped: REASON"``; never raises."""
    return {
        path.relative_to(root).as_posix(): (
            f"skipped: {result}" if isinstance(result, UnreadableFile) else result.text
        )
        for path, result in load_documents(discover(root), root, **options)
    }


def test_a_symlink_out_of_the_folder_is_skipped_unless_allowed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("root:x:0:0:secret account\n")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "page.md").write_text("# Page\nInside the folder.\n")
    (docs / "passwd.txt").symlink_to(outside)
    (docs / "sub" / "alias.md").symlink_to(docs / "page.md")  # inside: read
    (docs / "linked_dir").symlink_to(tmp_path, target_is_directory=True)  # never followed

    outcomes = read_all(docs)
    assert set(outcomes) == {"page.md", "passwd.txt", "sub/alias.md"}
    assert outcomes["sub/alias.md"] == outcomes["page.md"]
    reason = outcomes["passwd.txt"]
    assert reason.startswith(f"skipped: a symbolic link to {outside.resolve()}, outside")
    assert "ingestion.follow_symlinks_outside = true" in reason
    skipped = dict(load_documents(discover(docs), docs))[docs / "passwd.txt"]
    assert isinstance(skipped, UnreadableFile) and skipped.keep_stored is False  # rows go

    allowed = read_all(docs, follow_symlinks_outside=True)
    assert allowed["passwd.txt"] == "root:x:0:0:secret account\n"


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad-yaml.md", "---\ntitle: [unclosed\n---\nbody\n", "invalid front matter (ParserError"),
        ("tag.md", "---\ntitle: !!python/object:os.system ls\n---\nbody\n", "invalid front matter"),
        ("date.md", "---\ndate: 2024-13-45\n---\nbody\n", "invalid front matter (ValueError"),
    ],
)
def test_bad_front_matter_is_a_skip_not_a_stopped_run(tmp_path, name, content, reason):
    (tmp_path / name).write_text(content)
    (tmp_path / "good.md").write_text("# Good\nStill read.\n")
    outcomes = read_all(tmp_path)
    assert outcomes[name].startswith(f"skipped: {reason}"), outcomes[name]
    assert outcomes["good.md"] == "# Good\nStill read."


@pytest.mark.parametrize(
    ("title", "expected"),
    [("2024-01-31", "2024-01-31"), ("42", "42"), ("[a, b]", "page"), ("{x: 1}", "page"),
     ("true", "page"), ("''", "page"), ('"line one\\nline two"', "line one line two")],
)  # fmt: skip
def test_front_matter_titles_become_plain_one_line_strings(tmp_path, title, expected):
    (tmp_path / "page.md").write_text(f"---\ntitle: {title}\n---\nBody text.\n")
    doc = load_document(tmp_path / "page.md", tmp_path)
    assert doc.metadata["title"] == expected
    assert all(type(value) is str for value in doc.metadata.values())


def test_titles_and_headings_are_bounded_and_long_paths_are_read(tmp_path):
    deep = tmp_path.joinpath(*["d" * 200] * 3)  # a 600-character relative path
    deep.mkdir(parents=True)
    (deep / "long.md").write_text("# " + "Heading " * 400 + "\nBody.\n")
    (tmp_path / "fm.md").write_text("---\ntitle: " + "T" * 5000 + "\n---\nBody.\n")
    for path in (deep / "long.md", tmp_path / "fm.md"):
        doc = load_document(path, tmp_path)
        assert len(doc.metadata["title"]) <= 300  # readers.MAX_TITLE_CHARS
        assert doc.metadata["title"].endswith("…")
    assert load_document(deep / "long.md", tmp_path).doc_id == (
        (deep / "long.md").relative_to(tmp_path).as_posix()
    )


def test_broken_word_documents_are_skips(tmp_path, monkeypatch):
    import rag_app.components.readers as readers

    monkeypatch.setattr(readers, "MAX_DOCX_XML_BYTES", 2**20)  # 256 MB normally
    make_docx(tmp_path / "unclosed.docx", ["<w:r>never closed"])
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
            for i in range(1, 10)
        )
        + ']><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
        "<w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>"
    )
    with zipfile.ZipFile(tmp_path / "laughs.docx", "w") as archive:
        archive.writestr("word/document.xml", laughs)
    with zipfile.ZipFile(tmp_path / "bomb.docx", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", b"<a>" + b" " * (3 * 2**20) + b"</a>")
    assert (tmp_path / "bomb.docx").stat().st_size < 2**14  # small on disk
    make_docx(tmp_path / "fine.docx", ["Readable paragraph."])
    outcomes = read_all(tmp_path)
    assert outcomes["fine.docx"].strip() == "Readable paragraph."
    for name in ("unclosed.docx", "laughs.docx", "bomb.docx"):
        assert outcomes[name].startswith("skipped: not a readable Word document ("), outcomes
    assert "unpacks to 3 MB, over 1 MB" in outcomes["bomb.docx"]


def test_any_exception_of_a_parser_is_that_files_reason(tmp_path, monkeypatch):
    import rag_app.components.readers as readers

    def broken(data: bytes):
        raise RecursionError("maximum recursion depth exceeded\nwhile parsing")

    monkeypatch.setitem(readers.PARSERS, ".txt", ("text", broken))
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.md").write_text("# B\nfine")
    outcomes = read_all(tmp_path)
    assert outcomes == {
        "a.txt": "skipped: RecursionError: maximum recursion depth exceeded",
        "b.md": "# B\nfine",
    }


def test_a_file_that_vanishes_or_turns_into_a_pipe_after_discovery_is_a_skip(tmp_path):
    (tmp_path / "gone.md").write_text("# Gone\n")
    (tmp_path / "pipe.txt").write_text("soon a pipe")
    files = discover(tmp_path)
    (tmp_path / "gone.md").unlink()
    (tmp_path / "pipe.txt").unlink()
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block for ever
    outcomes = {p.name: str(r) for p, r in load_documents(files, tmp_path)}
    assert outcomes == {"gone.md": "No such file or directory", "pipe.txt": "not a regular file"}


def test_a_file_name_that_is_not_utf8_is_a_skip(tmp_path):
    name = os.fsdecode(b"caf\xe9.md")  # Latin-1 bytes: a lone surrogate in Python
    (tmp_path / name).write_text("# Café\n")
    ((_, result),) = list(load_documents(discover(tmp_path), tmp_path))
    assert str(result) == "its name is not valid UTF-8 (rename the file)"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be", "utf-8-sig"])
def test_text_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    text = "Größe des Indexes: 日本語 and plain ASCII."
    data = text.encode(encoding)
    if encoding.endswith("-be"):
        data = {"utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}[encoding] + data
    (tmp_path / "bom.txt").write_bytes(data)
    assert load_document(tmp_path / "bom.txt", tmp_path).text == text


def test_html_keeps_headings_as_markdown_lines_without_permalinks():
    page = PYTHON_DOCS / "library" / "functools.html"
    if not page.is_file():
        pytest.skip("python3-doc is not installed (scripts/setup.sh installs it)")
    parsed = load_document(page, page.parent)
    headings = [line for line in parsed.text.splitlines() if line.startswith("#")]
    assert headings[0] == "# functools — Higher-order functions and operations on callable objects"
    assert "## partial Objects" in headings
    assert "¶" not in parsed.text
    assert "Quick search" not in parsed.text and "Previous topic" not in parsed.text  # sidebar
    assert parsed.metadata["title"].startswith("functools — Higher-order functions")
    assert "Sometimes called “memoize”." in parsed.text  # source line breaks are spaces


def html_text(tmp_path: Path, markup: bytes) -> tuple[str, str]:
    (tmp_path / "page.html").write_bytes(markup)
    document = load_document(tmp_path / "page.html", tmp_path)
    return document.text, document.metadata["title"]


def test_html_text_extraction_rules(tmp_path):
    html = (
        "<html><head><title> The  Title </title><style>p{}</style></head><body>"
        "<nav>Menu</nav><header>Banner</header><div role='navigation'>Sidebar</div>"
        "<p>Outside main.</p><main><h2 id=a>Section <code>x</code>"
        "<a class='headerlink' href='#a'>¶</a></h2><p>First\nparagraph.</p><ul><li>one"
        "<li>two</ul><pre>code  line 1\ncode line 2</pre><h3></h3><script>alert(1)</script>"
        "</main><footer>Footer</footer></body></html>"
    )
    assert html_text(tmp_path, html.encode()) == (
        "## Section x\nFirst paragraph.\none\ntwo\n```\ncode line 1\ncode line 2\n```",
        "The Title",
    )
    no_main = html_text(tmp_path, b"<body><p>a</p><article><p>in article</p></article></body>")
    assert no_main == ("in article", "page")


@pytest.mark.timeout(60)  # BeautifulSoup took 190 s on this page (its work was quadratic)
def test_deeply_nested_html_parses_in_linear_work(tmp_path):
    """440 KB of 40,000 nested <div>s parses, with its text, well within the timeout; the
    tokenizer never recurses (it runs with almost no stack to spare) and keeps a flat stack,
    so stray end tags under deep nesting cost nothing either."""
    import inspect
    import sys
    import time

    page = b"<p>before</p>" + b"<div>" * 40_000 + b"x" + b"</div>" * 40_000 + b"<p>after</p>"
    deeper = b"<div>" * 100_000 + b"</span>" * 100_000 + b"x"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 40)
    try:
        started = time.perf_counter()
        assert html_text(tmp_path, page)[0] == "before\nx\nafter"
        seconds = time.perf_counter() - started
        assert html_text(tmp_path, deeper)[0] == "x"
    finally:
        sys.setrecursionlimit(limit)
    print(f"\n40,000 nested divs ({len(page) / 1000:.0f} KB) parsed in {seconds:.2f} s")
