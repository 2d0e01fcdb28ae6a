"""Include and exclude globs over the files of an ingested folder (``ingestion.include``,
``ingestion.exclude``).

A glob is matched against a file's path relative to the folder, with ``/`` between folders:
``**/`` is any number of folders (none too), ``*`` and ``?`` stay inside one path segment,
and the whole path must match (``*.md`` is a Markdown file at the top only; ``**/*.md`` is
one anywhere). One matcher for ingestion and for the evaluation sets' corpora
(``eval/corpora.json``), so the pages a question may cite are the pages ingested.

Standard library only: the CLI validates globs before anything heavy is imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache


@cache
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a glob over '/'-separated relative paths."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def matches(pattern: str, path: str) -> bool:
    """Whether the relative path ``path`` (``a/b.md``) matches the glob ``pattern``."""
    return glob_regex(pattern).match(path) is not None


def selected(path: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether a file is part of the folder: matched by an include glob (or no include
    globs at all) and by no exclude glob."""
    kept = not include or any(matches(p, path) for p in include)
    return kept and not any(matches(p, path) for p in exclude)


def unmatched(patterns: Iterable[str], paths: Iterable[str]) -> list[str]:
    """The globs that match none of ``paths``: a typo, most likely, which would otherwise
    silently ingest everything or nothing."""
    left = list(dict.fromkeys(patterns))
    for path in paths:
        if not left:
            break
        left = [p for p in left if not matches(p, path)]
    return left


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` can never match a path inside the folder, or None if it can."""
    if not pattern.strip():
        return "is empty"
    if pattern.startswith("/"):
        return "is absolute; globs are matched against paths relative to the ingested folder"
    if "\\" in pattern:
        return "has a backslash; separate folders with '/'"
    parts = pattern.split("/")
    if "." in parts or ".." in parts:
        return "has a '.' or '..' segment, which no path inside the folder has"
    return None
