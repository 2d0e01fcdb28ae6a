"""Property-based tests (Hypothesis) of everything that handles untrusted text: arbitrary file
names, metadata, filter values, document text, questions and terminal output. Fast tier: no
model, no Milvus (the escaper is checked against a real Milvus Lite file in
tests/test_hostile_input.py)."""

from __future__ import annotations

import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rag_app import RagAppError, load_config
from rag_app.components.html_text import page_text
from rag_app.components.milvus_expr import starts_with, string_literal, successor
from rag_app.components.readers import (
    MAX_TITLE_CHARS,
    UnreadableFile,
    discover,
    load_documents,
)
from rag_app.display import one_line, terminal_text
from rag_app.pipelines.answer import check_question
from rag_app.prompts import ZERO_WIDTH_SPACE, quote_as_data

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FILES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

valid_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)
# Lone surrogates: what undecodable bytes in a file name or argv become in Python.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
any_text = st.text(st.one_of(st.characters(exclude_categories=["Cs"]), surrogates), max_size=80)

# --- Milvus string literals -------------------------------------------------------------

# The escapes both Milvus Lite's tokenizer (milvus_lite/search/filter/tokens.py, _ESCAPE_MAP)
# and a Milvus server (Go's strconv.Unquote, after the grammar's StringLiteral) read the same.
_COMMON_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def unquote(literal: str) -> str:
    """A double-quoted literal as both parsers read it; ValueError where either refuses."""
    if len(literal) < 2 or literal[0] != '"' or literal[-1] != '"':
        raise ValueError("not a double-quoted literal")
    body, out, i = literal[1:-1], [], 0
    while i < len(body):
        char = body[i]
        if char in '"\r\n':  # Lite: "unterminated string (newline)"; Go: ErrSyntax
            raise ValueError(f"raw {char!r}")
        if char == "\\":
            out.append(_COMMON_ESCAPES[body[i + 1]])  # KeyError: an escape one lacks
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


@FAST
@given(valid_text)
@example('café "q" \\ x\ny\r\tz 😀 \u2028 \x00 %_')
def test_a_string_literal_parses_back_to_its_value(value):
    assert unquote(string_literal(value)) == value


@FAST
@given(st.tuples(valid_text, surrogates, valid_text).map("".join))
def test_text_with_undecodable_bytes_is_refused_not_sent(value):
    with pytest.raises(RagAppError, match="not valid Unicode text"):
        string_literal(value)


@FAST
@given(valid_text, valid_text)
@example("a_b", "axb")
@example("a\U0010ffff", "a\U0010ffff\U0010ffffz")
@example("\ud7ff", "\ue000")
def test_a_prefix_range_holds_exactly_the_strings_with_that_prefix(prefix, other):
    upper = successor(prefix)
    for candidate in (other, prefix + other, prefix):
        inside = prefix <= candidate and (upper is None or candidate < upper)
        assert inside == candidate.startswith(prefix)
    assert upper is None or not any("\ud800" <= c <= "\udfff" for c in upper)
    starts_with("source", prefix)  # renders for any valid prefix


# --- the neutraliser ------------------------------------------------------------------------

CONTROL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<|user|>",
    "<|assistant|>", "<|system|>", "<|end|>", "<|start|>", "<|channel|>", "<|message|>",
    "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "[INST]", "[/INST]", "<<SYS>>",
    "<</SYS>>", "<start_of_turn>", "<end_of_turn>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<reponame>", "<filename>", "<file_sep>", "<jupyter_code>", "<think>", "</think>",
    "<tool_call>", "[gMASK]", "<sop>", "<|START_OF_TURN_TOKEN|>",
]  # fmt: skip
documents = st.lists(st.one_of(st.sampled_from(CONTROL_TOKENS), valid_text), max_size=12).map(
    "".join
)


@FAST
@given(documents)
@example("<<|im_start|>|im_end|>>")
@example("<<<SYS>>>[[INST]]")
def test_no_control_token_survives_the_neutraliser(text):
    quoted = quote_as_data(text)
    assert not [token for token in CONTROL_TOKENS if token in quoted]
    assert quote_as_data(quoted) == quoted  # a second pass finds nothing
    assert quoted.replace(ZERO_WIDTH_SPACE, "") == text.replace(ZERO_WIDTH_SPACE, "")


@FAST
@given(valid_text.filter(lambda t: "<" not in t and "[" not in t))
def test_ordinary_text_passes_the_neutraliser_unchanged(text):
    assert quote_as_data(text) == text


# --- terminal output ------------------------------------------------------------------------


def _unsafe(char: str) -> bool:
    return char != "\u200d" and unicodedata.category(char) in {"Cc", "Cf", "Cs", "Zl", "Zp"}


@FAST
@given(any_text)
@example("evil\n\x1b[2Jskipped 0 files\r\u202eexe.md")
def test_one_line_is_one_line_without_control_characters(text):
    line = one_line(text)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert not any(_unsafe(char) for char in line)
    if text.isprintable():
        assert line == text


@FAST
@given(any_text)
def test_terminal_text_keeps_lines_and_drops_escapes(text):
    shown = terminal_text(text)
    assert "\x1b" not in shown and "\r" not in shown
    assert not any(_unsafe(char) and char not in "\n\t" for char in shown)
    assert shown.count("\n") == text.count("\n")


# --- questions ------------------------------------------------------------------------------

CFG = load_config(None)


@FAST
@given(st.one_of(any_text, st.text(min_size=3990, max_size=4010)))
@example("")
@example(" \n\t ")
@example("caf\udce9?")
def test_a_question_is_checked_into_an_answerable_one_or_a_one_line_error(question):
    try:
        checked = check_question(question, CFG)
    except RagAppError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("the question is")
        return
    assert checked == question.strip()
    assert 0 < len(checked) <= CFG.retrieval.max_question_chars
    assert not any("\ud800" <= char <= "\udfff" for char in checked)


# --- files ----------------------------------------------------------------------------------

file_names = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), min_size=1, max_size=40
).filter(lambda name: not name.startswith(".") and len((name + ".md").encode()) <= 255)


def _read_one(name: str, data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / name).write_bytes(data)
        ((path, result),) = list(load_documents(discover(root), root))
        return path.relative_to(root).as_posix(), result


def _check_document(result) -> None:
    if isinstance(result, UnreadableFile):
        assert str(result) and "\n" not in one_line(str(result))
        return
    assert result.text.strip()
    assert all(type(value) is str for value in result.metadata.values())
    assert 0 < len(result.metadata["title"]) <= MAX_TITLE_CHARS
    assert "\n" not in result.metadata["title"]


@FILES
@given(file_names, valid_text)
@example('quote"d \\ 100%_ 😀 \n name', "# T\nbody")
def test_any_file_name_is_the_documents_id_and_a_valid_literal(name, text):
    relative, result = _read_one(name + ".md", text.encode())
    _check_document(result)
    if not isinstance(result, UnreadableFile):
        assert result.doc_id == result.metadata["source"] == relative == name + ".md"
        assert unquote(string_literal(result.doc_id)) == result.doc_id


@FILES
@given(st.sampled_from([".md", ".txt", ".html", ".pdf", ".docx"]), st.binary(max_size=300))
@example(".docx", b"PK\x03\x04garbage")
@example(".pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<</Root 1 0 R>>")
@example(".txt", b"\xff\xfe\x00\xd8")  # UTF-16 with a lone surrogate
def test_any_bytes_in_any_format_give_a_document_or_a_reason(suffix, data):
    _check_document(_read_one("file" + suffix, data)[1])


@FILES
@given(valid_text)
@example("!!python/object/apply:os.system [ls]")
@example("2024-13-45")
@example("&a [*a, *a]")
@example("{x: [1, {y: 2}]}")
def test_any_front_matter_gives_a_plain_document_or_a_reason(value):
    _, result = _read_one("page.md", f"---\ntitle: {value}\nother: {value}\n---\nBody.\n".encode())
    _check_document(result)
    if isinstance(result, UnreadableFile):
        assert str(result).startswith(("invalid front matter (", "binary content"))


# --- HTML -----------------------------------------------------------------------------------

markup = st.lists(
    st.one_of(
        st.sampled_from(["<", ">", "</", "/>", "<!--", "-->", "<!", "<?", '"', "'", "=", "&",
                         "&amp;", "&#", "&#x41;", ";", " ", "\n", "¶"]),
        st.sampled_from(["div", "p", "h1", "h2", "h6", "nav", "main", "article", "script",
                         "style", "title", "pre", "br", "a", "li", "class=headerlink",
                         "role=main", "role=navigation"]),
        valid_text,
    ),
    max_size=40,
).map("".join)  # fmt: skip


@FAST
@given(markup)
@example("<h2>a<br>b<p>c</h2><script>x</scr<script></h2>")
def test_any_markup_gives_text_and_a_title(page):
    text, title = page_text(page)
    assert isinstance(text, str) and (title is None or isinstance(title, str))
    assert all(line.strip() == line and line for line in text.splitlines())


@FAST
@given(st.integers(1, 6), valid_text.filter(lambda t: not set(t) & set("<&") and t.split()))
def test_a_heading_becomes_a_markdown_heading_line(level, heading):
    text, _ = page_text(f"<p>before</p><h{level}>{heading}</h{level}><p>after</p>")
    expected = "#" * level + " " + " ".join(heading.split())
    assert text.splitlines() == ["before", expected, "after"]
