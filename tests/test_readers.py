"""Files to documents: each format's text and metadata, and the reasons files are skipped."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from rag_app.components.readers import UnreadableFile, discover, load_document


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
