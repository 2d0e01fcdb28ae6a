"""Milvus filter expressions from values that may hold anything: quotes, backslashes, newlines,
emoji, ``%`` and ``_``. Every expression rag_app sends is built here.

pymilvus 2.6's templated filters (``filter="doc_id == {id}", filter_params=...``) would keep
values out of the expression text, but Milvus Lite 3.2.2 does not read templates
("unexpected character '{'") and Milvus servers before 2.4.x do not either. So values are
written as string literals by :func:`string_literal` alone, with only the escapes that Milvus
Lite's tokenizer (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``) and a Milvus server's parser
(Go's ``strconv.Unquote``) both read, and read the same way; every other character, non-ASCII
ones included, is written as itself (``json.dumps`` writes ``é`` as ``\\u00e9``, which Lite
refuses).

A prefix is matched by a range of strings (``key >= "ab" and key < "ac"``), not by ``like
"ab%"``: in a ``like`` pattern ``_`` and ``%`` are wildcards, and Milvus Lite evaluates
patterns on dynamic fields without any escape character.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)

from rag_app.errors import RagAppError

_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Words Milvus's grammar reserves: a metadata key spelled like one is addressed as $meta["..."].
_KEYWORDS = {
    "and", "or", "not", "in", "like", "is", "null", "true", "false", "exists",
    "json_contains", "json_contains_all", "json_contains_any", "array_contains",
    "array_contains_all", "array_contains_any", "array_length", "text_match", "phrase_match",
    "random_sample",
}  # fmt: skip
_MAX_CODE_POINT = 0x10FFFF
ID_FIELD = "id"  # the primary key of LlamaIndex's Milvus collections: the chunk id
_SURROGATES = range(0xD800, 0xE000)


def string_literal(value: str) -> str:
    """``value`` as a Milvus string literal that both Milvus Lite and a server parse back to
    exactly ``value``. A string with undecodable bytes (lone surrogates, from a file name that
    is not UTF-8) cannot travel to Milvus at all: :class:`RagAppError`."""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if any(ord(char) in _SURROGATES for char in value):
        raise RagAppError(f"{value!r} is not valid Unicode text (undecodable bytes)")
    return '"' + value.translate(_ESCAPES) + '"'


def literal(value: object) -> str:
    """A string, number or boolean as a Milvus literal; a list as a list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RagAppError(f"cannot filter on {value!r}: use a finite number")
        return repr(value)
    if isinstance(value, str):
        return string_literal(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    raise RagAppError(f"cannot filter on a {type(value).__name__} value: {value!r}")


def operand(name: str) -> str:
    """A field as an expression operand: schema fields and plain metadata keys by name, any
    other metadata key (spaces, quotes, a reserved word) as ``$meta["..."]``."""
    if _IDENTIFIER.match(name) and name.lower() not in _KEYWORDS:
        return name
    return f"$meta[{string_literal(name)}]"


ALL_ROWS = f'{ID_FIELD} != ""'  # a query over every row (Milvus wants some filter)


def equals(name: str, value: object) -> str:
    return f"{operand(name)} == {literal(value)}"


def absent_or_not(name: str, value: object) -> str:
    """Rows whose metadata key ``name`` is missing or differs from ``value``. (Milvus Lite
    reads ``!=`` on a missing key as unknown and a Milvus 2.3 server has no ``is null``;
    ``exists`` means the same on both.)"""
    return f"(not (exists {operand(name)}) or {operand(name)} != {literal(value)})"


def one_of(name: str, values: Iterable[object]) -> str:
    return f"{operand(name)} in {literal(list(values))}"


def successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix`` (in code
    point order, which is UTF-8 byte order), or None when there is none (a prefix of
    U+10FFFF characters only)."""
    text = prefix.rstrip(chr(_MAX_CODE_POINT))
    if not text:
        return None
    code = ord(text[-1]) + 1
    if code in _SURROGATES:  # no string holds one, so none lies in between
        code = _SURROGATES.stop
    return text[:-1] + chr(code)


def starts_with(name: str, prefix: str) -> str:
    """Rows whose string ``name`` starts with ``prefix`` (``%`` and ``_`` are literal)."""
    lower = f"{operand(name)} >= {string_literal(prefix)}"
    upper = successor(prefix)
    return lower if upper is None else f"({lower} and {operand(name)} < {string_literal(upper)})"


_COMPARISONS = {
    FilterOperator.EQ: "==",
    FilterOperator.NE: "!=",
    FilterOperator.GT: ">",
    FilterOperator.GTE: ">=",
    FilterOperator.LT: "<",
    FilterOperator.LTE: "<=",
    FilterOperator.IN: "in",
    FilterOperator.NIN: "not in",
}


def _condition(item: MetadataFilter) -> str:
    if item.operator == FilterOperator.TEXT_MATCH:  # a prefix, as parse_filters writes it
        if not isinstance(item.value, str):
            raise RagAppError(f"a prefix filter on {item.key!r} needs a string")
        return starts_with(item.key, item.value)
    operator = _COMPARISONS.get(item.operator)
    if operator is None:
        supported = ", ".join(op.value for op in [*_COMPARISONS, FilterOperator.TEXT_MATCH])
        raise RagAppError(
            f"filter operator {item.operator.value!r} on {item.key!r} is not supported "
            f"(supported: {supported})"
        )
    return f"{operand(item.key)} {operator} {literal(item.value)}"


def render_filters(filters: MetadataFilters) -> str:
    """LlamaIndex ``MetadataFilters`` (nested, AND/OR/NOT) as one Milvus expression."""
    parts = [
        f"({render_filters(item)})" if isinstance(item, MetadataFilters) else _condition(item)
        for item in filters.filters
    ]
    if not parts:
        return ""
    if filters.condition == FilterCondition.NOT:
        return "not (" + " and ".join(parts) + ")"
    joiner = " or " if filters.condition == FilterCondition.OR else " and "
    return joiner.join(f"({part})" for part in parts) if len(parts) > 1 else parts[0]


def filter_keys(filters: MetadataFilters) -> list[str]:
    """Every metadata key ``filters`` names, nested filters included, in order."""
    keys: list[str] = []
    for item in filters.filters:
        keys.extend(filter_keys(item) if isinstance(item, MetadataFilters) else [item.key])
    return list(dict.fromkeys(keys))
