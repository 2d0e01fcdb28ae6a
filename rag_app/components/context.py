"""The context a chunk carries into its embedding and its BM25 entry: ``chunking.context_template``.

A chunk such as "Set it to 16" says nothing about what "it" is; its page title and the
headings above it do. The template (e.g. ``"{title} > {section}\\n{source}"``) is rendered
for every chunk into a header that is embedded with the chunk's text and indexed with it by
BM25 (the collection's ``context_text`` field), while the LLM and the sources shown to users
keep the chunk's own text. This module imports only the standard library: the settings
validate templates with it, and the fast tests render them without any model.

Rendering rules, so that a chunk without some value reads cleanly: a variable with no value
for a chunk (a page without headings has no ``section``) disappears together with the text
that separates it from the previous variable on its line (or from the next one, when it is
the first); a line whose variables are all empty disappears; a line without variables stays.
"""

from __future__ import annotations

import string
from collections.abc import Mapping

# The metadata key that holds a chunk's rendered header (kept out of the LLM's view).
CONTEXT_KEY = "context"
# The variables a template may use: metadata every chunk may carry.
VARIABLES = ("title", "section", "source", "doc_type")
DEFAULT_TEMPLATE = "{title} > {section}\n{source}"
SECTION_SEPARATOR = " > "  # between the headings of a section path
_FORMATTER = string.Formatter()


def check_template(template: str) -> str:
    """The template if it renders, else :class:`ValueError` naming the problem and the fix."""
    allowed = ", ".join("{" + name + "}" for name in VARIABLES)
    try:
        parts = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise ValueError(
            f"{exc} in {template!r} (write literal braces as {{{{ and }}}}; variables: {allowed})"
        ) from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in VARIABLES:
            raise ValueError(f"unknown variable {{{name}}} in {template!r} (variables: {allowed})")
        if spec or conversion:
            raise ValueError(
                f"{{{name}}} takes no format spec or conversion in {template!r} "
                f"(write it as {{{name}}})"
            )
    return template


def render_context(template: str, values: Mapping[str, object]) -> str:
    """The header ``template`` makes of a chunk's ``values`` ("" when nothing is left)."""
    lines = []
    for line in template.split("\n"):
        parts = list(_FORMATTER.parse(line))
        if not any(name is not None for _lit, name, _spec, _conv in parts):
            lines.append(line)
            continue
        rendered, pending, kept, first = "", "", False, True
        for literal, name, _spec, _conv in parts:
            if name is None:  # the text after the last variable: the line's end
                if kept:
                    rendered += literal
                continue
            if first or kept:  # the line's opening text, or the separator after a value
                pending, first = literal, False
            # else: the separator after an empty variable goes with that variable
            value = values.get(name)
            text = "" if value is None else " ".join(str(value).split())
            if text:
                rendered += pending + text
                kept = True
        if kept:
            lines.append(rendered)
    return "\n".join(lines).strip()


def contextual_text(text: str, header: str | None) -> str:
    """What is embedded and BM25-indexed for a chunk: its header, a blank line, its text."""
    return f"{header}\n\n{text}" if header else text
