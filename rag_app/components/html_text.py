"""Readable text from HTML, in time linear in the page's size, whatever the page holds.

Neither HTML parser at hand is linear on hostile input. BeautifulSoup over ``html.parser``
took 60 s on 20,000 nested ``<div>``\\ s and 190 s on 40,000 (quadratic); the standard
library's ``html.parser`` alone is quadratic on unterminated constructs (80,000 ``<!--``:
75 s; 80,000 ``<a``: 27 s); libxml2 (lxml 6.1, libxml2 2.14) is quadratic on one tag with
tens of thousands of attributes (40,000: 21 s) and, without its depth limit, on stray end
tags under deep nesting (so it must stop at 256 levels and drop the rest of the page).

So pages are read by the small tokenizer below: every step is an anchored regular
expression match or a forward ``find`` that consumes what it scanned, and no scan is
repeated, so the work is linear in the page's size. Tags become ``start``/``end``/``data``
events for :class:`_PageText`, which keeps a flat stack of open tags (an end tag with no
open start costs O(1); one that closes several pops each once) and never recurses.

The text rules: the first ``<main>`` (or ``role="main"``) is the text if it has any, else
the first ``<article>``, else the whole page; boilerplate (``script``, ``style``, ``nav``,
``header``, ``footer``, ``aside``, ``form``, ``noscript``, ``template``, ARIA navigation
roles) and Sphinx's ``¶`` permalinks (``<a class="headerlink">``) are dropped; block
elements end lines; headings become Markdown heading lines (``## Title``) and ``<pre>`` text
a fenced code block, so sections are found in HTML as in Markdown (a ``# comment`` in code
is no heading); ``<title>`` is the title.
"""

from __future__ import annotations

import html
import re

_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "pre", "table", "section", "article", "blockquote"}
_BLOCK_TAGS |= {"ul", "ol", "dl", "dt", "dd", "main", "figure", "figcaption", "hr", "td", "th"}
FENCE = "```"  # around <pre> text, as in Markdown
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_BOILERPLATE_TAGS = {"script", "style", "noscript", "nav", "header", "footer", "aside", "form"}
_BOILERPLATE_TAGS.add("template")
_BOILERPLATE_ROLES = {"navigation", "banner", "contentinfo", "search", "complementary"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"}
_VOID_TAGS |= {"param", "source", "track", "wbr"}
# Elements whose content is text up to their end tag (HTML's raw text and RCDATA elements).
_RAW_TEXT = {"script", "style", "xmp", "iframe", "noembed", "noframes", "noscript"}
_RCDATA = {"title", "textarea"}  # character references are decoded in these

_SPACE = "\t\n\f\r "
_TAG_NAME = re.compile(rf"[A-Za-z][^{_SPACE}/>]*")
_SEPARATORS = re.compile(rf"[{_SPACE}/]+")
_ATTRIBUTE = re.compile(
    rf"""([^{_SPACE}/>][^{_SPACE}/>=]*)"""  # a name (HTML lets it start with '=')
    rf"""(?:[{_SPACE}]*=[{_SPACE}]*("[^"]*(?:"|\Z)|'[^']*(?:'|\Z)|[^{_SPACE}>]*))?"""
)
_COMMENT_END = re.compile(r"--!?>")
# Every character str.splitlines() breaks at: outside <pre> all are spaces, inside all but \n.
_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_BREAKS_AS_SPACES = str.maketrans(_BREAKS, " " * len(_BREAKS))
_OTHER_BREAKS_AS_SPACES = str.maketrans(_BREAKS[1:], " " * (len(_BREAKS) - 1))
_end_tag_cache: dict[str, re.Pattern[str]] = {}


class _PageText:
    """Receives a page's tags and text in order and keeps what a reader would read."""

    def __init__(self) -> None:
        self._open: list[str] = []  # the tags open now, outermost first
        self._counts: dict[str, int] = {}  # how many of each are open
        self._skip_at: int | None = None  # depth of the dropped element we are inside
        self._heading_at: int | None = None
        self._title_at: int | None = None
        self._pre = 0  # <pre> elements open: their line breaks are the text's
        self._regions: dict[str, list[str]] = {"main": [], "article": [], "page": []}
        self._region_at: dict[str, int | None] = {"main": None, "article": None}
        self._title: list[str] = []
        self._titled = False

    def start(self, tag: str, attributes: dict[str, str]) -> None:
        depth = len(self._open)
        self._open.append(tag)
        self._counts[tag] = self._counts.get(tag, 0) + 1
        self._pre += tag == "pre"
        if self._skip_at is not None:
            return
        if tag == "title" and not self._titled:
            self._title_at = depth
            return
        role = attributes.get("role", "").lower()
        if (
            tag in _BOILERPLATE_TAGS
            or role in _BOILERPLATE_ROLES
            or (tag == "a" and "headerlink" in attributes.get("class", "").split())
        ):
            self._skip_at = depth
            return
        starts = {"main": tag == "main" or role == "main", "article": tag == "article"}
        for region, found in starts.items():
            if found and self._region_at[region] is None and not self._regions[region]:
                self._region_at[region] = depth  # the first one only
        if self._heading_at is not None and tag == "br":
            self._emit(" ")  # a heading stays on one line
            return
        if self._heading_at is not None and (tag in _BLOCK_TAGS or tag in _HEADINGS):
            self._end_heading()  # an unclosed heading ends where a block begins
        if tag == "pre" and self._pre == 1 and self._heading_at is None:
            self._emit(f"\n{FENCE}\n")  # code, fenced: a "# comment" in it is no heading
        elif tag in _HEADINGS:
            self._heading_at = depth
            self._emit("\n" + "#" * _HEADINGS[tag] + " ")
        elif tag in _BLOCK_TAGS:
            self._emit("\n")

    def end(self, tag: str) -> None:
        if not self._counts.get(tag):  # a stray end tag: nothing to close
            return
        while self._open:  # close what the end tag implies, up to its own start
            closed = self._open.pop()
            self._counts[closed] -= 1
            self._pre -= closed == "pre"
            self._closed(closed, len(self._open))
            if closed == tag:
                break

    def _closed(self, tag: str, depth: int) -> None:
        if self._skip_at is not None:
            if depth == self._skip_at:
                self._skip_at = None
            return
        if depth == self._title_at:
            self._title_at, self._titled = None, True
            return
        if depth == self._heading_at:
            self._end_heading()
        elif tag == "pre" and not self._pre and self._heading_at is None:
            self._emit(f"\n{FENCE}\n")
        elif tag in _BLOCK_TAGS and not (tag == "br" and self._heading_at is not None):
            self._emit("\n")
        for region, at in self._region_at.items():
            if at == depth:
                self._region_at[region] = None
                self._regions[region].append("\n")

    def _end_heading(self) -> None:
        self._heading_at = None
        self._emit("\n")

    def data(self, text: str) -> None:
        if self._skip_at is not None:
            return
        if self._title_at is not None:
            self._title.append(text)
            return
        # Outside <pre>, a line break in the source is a space, as a browser shows it.
        flowing = self._heading_at is not None or not self._pre
        self._emit(text.translate(_BREAKS_AS_SPACES if flowing else _OTHER_BREAKS_AS_SPACES))

    def _emit(self, text: str) -> None:
        self._regions["page"].append(text)
        for region, at in self._region_at.items():
            if at is not None:
                self._regions[region].append(text)

    def result(self) -> tuple[str, str | None]:
        text = ""
        for parts in self._regions.values():  # main, then article, then the page
            lines = (" ".join(line.split()) for line in "".join(parts).splitlines())
            text = "\n".join(line for line in lines if line.strip("#"))  # no empty headings
            if text:
                break
        return text, " ".join("".join(self._title).split()) or None


def _attributes(markup: str, pos: int) -> tuple[dict[str, str], int, bool]:
    """A start tag's attributes from ``pos``: (attributes, position after ``>``, whether the
    tag ended at all). An unterminated tag runs to the end of the page, as HTML says."""
    attributes: dict[str, str] = {}
    end = len(markup)
    while pos < end:
        separators = _SEPARATORS.match(markup, pos)
        if separators:
            pos = separators.end()
            continue
        if markup[pos] == ">":
            return attributes, pos + 1, True
        match = _ATTRIBUTE.match(markup, pos)  # consumes at least one character here
        assert match is not None
        name, value = match.group(1).lower(), match.group(2) or ""
        if value[:1] in ("'", '"'):
            value = value[1:-1] if len(value) > 1 and value[-1] == value[0] else value[1:]
        attributes.setdefault(name, html.unescape(value))
        pos = match.end()
    return attributes, end, False


def _raw_end(tag: str) -> re.Pattern[str]:
    pattern = _end_tag_cache.get(tag)
    if pattern is None:
        pattern = _end_tag_cache[tag] = re.compile(rf"</{tag}(?=[{_SPACE}/>]|\Z)", re.IGNORECASE)
    return pattern


def page_text(markup: str) -> tuple[str, str | None]:
    """The readable text of an HTML page (headings as Markdown lines) and its title."""
    page = _PageText()
    pos, end = 0, len(markup)
    while pos < end:
        lt = markup.find("<", pos)
        if lt < 0:
            page.data(html.unescape(markup[pos:]))
            break
        if lt > pos:
            page.data(html.unescape(markup[pos:lt]))
        pos = lt
        if markup.startswith("<!--", pos):
            if markup.startswith(("<!-->", "<!--->"), pos):
                pos = markup.index(">", pos + 4) + 1
                continue
            comment_end = _COMMENT_END.search(markup, pos + 4)
            pos = comment_end.end() if comment_end else end
            continue
        name = _TAG_NAME.match(markup, pos + 2) if markup.startswith("</", pos) else None
        if name is not None:  # an end tag; its attributes, if any, mean nothing
            close = markup.find(">", name.end())
            if close < 0:
                break
            page.end(name.group(0).lower())
            pos = close + 1
            continue
        if markup.startswith(("<!", "<?", "</"), pos):  # doctype, processing instruction ...
            close = markup.find(">", pos + 2)
            pos = close + 1 if close >= 0 else end
            continue
        name = _TAG_NAME.match(markup, pos + 1)
        if name is None:  # a '<' that opens nothing is text
            page.data("<")
            pos += 1
            continue
        tag = name.group(0).lower()
        attributes, pos, ended = _attributes(markup, name.end())
        if not ended:
            break
        page.start(tag, attributes)
        if tag in _VOID_TAGS:
            page.end(tag)
        elif tag in _RAW_TEXT or tag in _RCDATA:
            raw_end = _raw_end(tag).search(markup, pos)
            stop = raw_end.start() if raw_end else end
            raw = markup[pos:stop]
            page.data(html.unescape(raw) if tag in _RCDATA else raw)
            pos = stop
    return page.result()
