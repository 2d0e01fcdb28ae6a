"""Inline citations: excerpts are numbered in the prompt, answers cite them as ``[n]``.

The numbers are the positions of the retrieved chunks in ``response.source_nodes`` (1 =
best), so ``[2]`` in an answer is the second source listed. A model may cite a number that
no excerpt carries; such citations are removed, not shown as if they were grounded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CITATION = re.compile(r"\[(\d{1,3})\]")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"[ \t]+(?=[.,;:!?])")


def number_excerpts(texts: Sequence[str]) -> list[str]:
    """``[n] text`` for each excerpt, numbered from 1 in the order given (best first)."""
    return [f"[{number}] {text}" for number, text in enumerate(texts, 1)]


def check_citations(answer: str, count: int) -> tuple[str, list[int]]:
    """The answer without citations outside ``1..count``, and the valid numbers it cites."""
    cited: set[int] = set()

    def keep_if_known(match: re.Match[str]) -> str:
        number = int(match.group(1))
        if 1 <= number <= count:
            cited.add(number)
            return match.group(0)
        return ""

    checked = _CITATION.sub(keep_if_known, answer)
    if checked != answer:
        checked = _SPACE_BEFORE_PUNCTUATION.sub("", checked)
    return checked, sorted(cited)
