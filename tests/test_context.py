"""The context template (fast tier): how headers render, which text is embedded and which the
LLM sees, section paths in Markdown and HTML, and the sync fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest
from llama_index.core.schema import MetadataMode

from rag_app import RagAppError, load_config
from rag_app.components.chunking import chunk_documents, embed_text
from rag_app.components.context import DEFAULT_TEMPLATE, check_template, render_context
from rag_app.components.readers import load_documents
from rag_app.pipelines.ingest import fingerprint

FULL = {"title": "Index guide", "section": "HNSW > Parameters", "source": "guide/index.md"}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (FULL, "Index guide > HNSW > Parameters\nguide/index.md"),
        ({**FULL, "section": None}, "Index guide\nguide/index.md"),
        ({**FULL, "section": ""}, "Index guide\nguide/index.md"),
        ({**FULL, "title": None}, "HNSW > Parameters\nguide/index.md"),
        ({"source": "a.md"}, "a.md"),
        ({}, ""),
    ],
)
def test_the_default_template_drops_missing_values_with_their_separators(values, expected):
    header = render_context(DEFAULT_TEMPLATE, values)
    assert header == expected
    assert "None" not in header and not header.startswith(" >") and " > \n" not in header + "\n"


def test_a_template_keeps_its_own_text_around_the_values():
    template = "Page: {title} / {section} / {source}.\nFrom the docs"
    assert render_context(template, {"title": "T", "source": "a.md"}) == (
        "Page: T / a.md.\nFrom the docs"
    )
    assert render_context(template, {"section": "S"}) == "Page: S.\nFrom the docs"
    assert render_context("", FULL) == ""
    assert render_context("{title}", {"title": "  two\n lines "}) == "two lines"


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{author}", "unknown variable {author}"),
        ("{title", "expected '}'"),
        ("{title:>10}", "takes no format spec"),
        ("{title!r}", "takes no format spec"),
    ],
)
def test_a_bad_template_is_one_line_naming_the_fix(template, problem):
    with pytest.raises(ValueError, match=r"variables: |write it as"):
        check_template(template)
    with pytest.raises(RagAppError) as error:
        load_config(None, chunking__context_template=template)
    message = str(error.value)
    assert "chunking.context_template" in message and problem in message
    assert "\n" not in message


def read(tmp_path: Path, name: str, text: str):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
    ((_, document),) = list(load_documents([tmp_path / name], tmp_path))
    return document


GUIDE = (
    "# Index guide\n\nIndexes trade memory for speed.\n\n## HNSW\n\nA graph index.\n\n"
    "### Parameters\n\nSet it to 16.\n\n## IVF\n\nClusters.\n"
)


def test_chunks_embed_title_section_path_and_source_and_the_llm_sees_the_text(small_cfg, tmp_path):
    small_cfg.chunking.chunk_overlap, small_cfg.chunking.chunk_size = 0, 40
    chunks = chunk_documents(small_cfg, [read(tmp_path, "guide/index.md", GUIDE)])
    by_text = {chunk.get_content(): chunk for chunk in chunks}
    deep = next(chunk for text, chunk in by_text.items() if "Set it to 16" in text)
    assert deep.metadata["section"] == "Index guide > HNSW > Parameters"
    # The title is not repeated when it is the page's first heading.
    assert embed_text(deep) == (
        "Index guide > HNSW > Parameters\nguide/index.md\n\n" + deep.get_content()
    )
    ivf = next(chunk for text, chunk in by_text.items() if "Clusters" in text)
    assert ivf.metadata["section"] == "Index guide > IVF"  # ### Parameters closed by ## IVF
    top = next(chunk for text, chunk in by_text.items() if "trade memory" in text)
    assert embed_text(top).startswith("Index guide\nguide/index.md\n\n")  # no dangling " > "
    for chunk in chunks:
        llm = chunk.get_content(metadata_mode=MetadataMode.LLM)
        assert "HNSW > Parameters" not in llm and "Index guide > " not in llm
        assert llm.count("guide/index.md") == 1  # the source, once, as before
        assert chunk.get_content(metadata_mode=MetadataMode.EMBED) == chunk.get_content()


def test_html_pages_get_section_paths_and_code_comments_are_no_headings(small_cfg, tmp_path):
    small_cfg.chunking.chunk_overlap, small_cfg.chunking.chunk_size = 0, 60
    page = (
        "<html><head><title>os — OS interfaces</title></head><body><main>"
        "<h1>os module</h1><p>Portable functions.</p><h2>Files</h2><p>Open files here.</p>"
        "<pre># not a heading\nfd = os.open(path)\n</pre><p>More about files and descriptors.</p>"
        "<h3>Modes</h3><p>Read and write modes.</p></main></body></html>"
    )
    chunks = chunk_documents(small_cfg, [read(tmp_path, "library/os.html", page)])
    sections = {chunk.metadata.get("section") for chunk in chunks}
    assert sections <= {"os module", "os module > Files", "os module > Files > Modes"}
    assert "os module > Files > Modes" in sections
    modes = next(chunk for chunk in chunks if "Read and write" in chunk.get_content())
    assert embed_text(modes).startswith(
        "os — OS interfaces > os module > Files > Modes\nlibrary/os.html\n\n"
    )


def test_an_empty_template_embeds_bare_chunks(small_cfg, tmp_path):
    small_cfg.chunking.context_template = ""
    chunks = chunk_documents(small_cfg, [read(tmp_path, "guide.md", GUIDE)])
    assert all(embed_text(chunk) == chunk.get_content() for chunk in chunks)
    assert all("context" not in chunk.metadata for chunk in chunks)


def test_the_fingerprint_changes_with_the_template(small_cfg, tmp_path):
    document = read(tmp_path, "guide.md", GUIDE)
    before = fingerprint(small_cfg, document)
    assert fingerprint(small_cfg, document) == before
    small_cfg.chunking.context_template = "{title}"
    assert fingerprint(small_cfg, document) != before
