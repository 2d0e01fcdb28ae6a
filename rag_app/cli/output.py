"""What ``query`` and ``chat`` print, the same whether the answer came from this process
or from a running server (kept free of heavy imports for the client path)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rag_app.display import one_line
from rag_app.errors import RagAppError

CITATIONS_NOTE = "(citations to no listed source were printed above; ignore them)"


def print_sources(sources: Sequence[Mapping[str, Any]], *, heading: bool = True) -> None:
    """Numbered sources, as :func:`rag_app.pipelines.answer.source_dicts` gives them."""
    if heading:
        print("\nSources:" if sources else "\nSources: none relevant enough")
    for source in sources:
        print(
            f"  [{source['number']}] {one_line(str(source['source']))}  (score {source['score']})"
        )


def question_lines(file: str) -> list[tuple[int, str]]:
    """The non-blank lines of ``file`` (``-``: stdin), numbered from 1."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RagAppError(f"cannot read questions from {file}: {exc}") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
