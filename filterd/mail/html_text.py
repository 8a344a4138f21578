"""Visible text of an HTML part: what a reader of the rendered mail sees, tags gone, entities decoded."""

from __future__ import annotations

import re
from html import unescape

_MANY_NEWLINES = re.compile(r"\n{3,}")

# HTMLParser (measured on CPython 3.11.7) is quadratic on unterminated markup: 400 KB of
# "<a<a<a..." takes two minutes, 1 MB of "<!--<!--..." seven, 40 KB of "<a x='>'" four
# seconds.  A mail filter must not stall on one hostile message, so a linear pre-pass
# tokenises the markup the way HTML5 does (comments, raw-text <script>/<style>, quoted
# attribute values, EOF inside a tag) and leaves only bare tags such as "<p>" and "</td>"
# between runs of text.  Those are split off directly and each run's entities decoded with
# html.unescape: what HTMLParser(convert_charrefs=True) does with such input, at a third of
# its cost.

_HTML_SPACE = re.compile(r"\s+")
# Where a comment or a raw-text element (whose content is never markup) starts.
_HIDDEN_BLOCK = re.compile(r"<!--|<(script|style)(?![^\s/>])", re.IGNORECASE)
_COMMENT_END = re.compile(r"--!?>")
_RAW_TEXT_END = {
    "script": re.compile(r"</script", re.IGNORECASE),
    "style": re.compile(r"</style", re.IGNORECASE),
}
_MARKUP = re.compile(
    r"""
    <(/?)([A-Za-z][^\s/>]*+)                          # a tag and its name
      (?:[\s/]++|[^\s/>=]++|=\s*+(?:"[^"]*+"|'[^']*+'|[^\s>]*+))*+   # attributes
      (?:>|\Z)                                        # EOF inside a tag: the rest is tag
    | <[!?/][^>]*+(?:>|\Z)                             # <!DOCTYPE>, <![if]>, <?xml?>: no text
    | <                                               # any other "<" is text
    """,
    re.VERBOSE,
)
_TAG_NAME = re.compile(r"[a-z][a-z0-9]*")
_BARE_TAG = re.compile(r"<(/?)([a-z][a-z0-9]*)>")  # what _canonical_markup leaves of a tag


class _TextCollector:
    """Collects visible text; block elements become line breaks."""

    HIDDEN = frozenset({"head", "title", "noscript", "template", "script", "style"})
    HEAD_CONTENT = frozenset({"title", "meta", "link", "style", "script", "base", "noscript", "template"})
    PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "pre", "ul", "ol"})
    LINE = frozenset({"div", "tr", "li", "dt", "dd", "hr", "center", "form", "address", "caption"})
    CELL = frozenset({"td", "th"})

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.hidden: list[str] = []  # open hidden elements, innermost last
        # Line breaks owed before the next text: "</li><li>" or "</p>\n<p>" must not add up.
        self.newlines = 0

    def handle_starttag(self, tag: str) -> None:
        if tag == "body":
            self.hidden.clear()  # an unclosed <head> must not swallow the body
        elif self.hidden and self.hidden[-1] == "head" and tag not in self.HEAD_CONTENT:
            self.hidden.pop()  # body content implies </head>, as browsers treat it
        if tag in self.HIDDEN:
            self.hidden.append(tag)
        if tag == "br":
            self.newlines += 1  # unlike block edges, every <br> counts
        self._block_edge(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.hidden:
            while self.hidden.pop() != tag:
                pass
        self._block_edge(tag)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        text = _HTML_SPACE.sub(" ", data)  # source newlines are just spaces
        if text.strip() and self.newlines:
            self.chunks.append("\n" * self.newlines)
            self.newlines = 0
        self.chunks.append(text)

    def _block_edge(self, tag: str) -> None:
        if tag in self.PARAGRAPH:
            self.newlines = max(self.newlines, 2)
        elif tag in self.LINE:
            self.newlines = max(self.newlines, 1)
        elif tag in self.CELL:
            self.chunks.append(" ")


def html_to_text(html: str) -> str:
    """Visible text of an HTML document: no tags, entities unescaped, tidy whitespace."""
    collector = _TextCollector()
    markup = _MARKUP.sub(_canonical_markup, _strip_hidden_blocks(html))
    pos = 0
    for tag in _BARE_TAG.finditer(markup):  # every "<" left is one of these
        if tag.start() > pos:
            collector.handle_data(unescape(markup[pos : tag.start()]))
        (collector.handle_endtag if tag[1] else collector.handle_starttag)(tag[2])
        pos = tag.end()
    if pos < len(markup):
        collector.handle_data(unescape(markup[pos:]))
    text = "".join(collector.chunks)
    lines = (" ".join(line.split()) for line in text.replace("\r", "\n").split("\n"))
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def _strip_hidden_blocks(html: str) -> str:
    """Drop comments and <script>/<style> elements.

    An unclosed <script>/<style> hides the rest, as in browsers.  An unclosed comment ends
    at the next ">" instead (older parsers' reading): spam templates with a stray "<!--"
    would otherwise lose their whole text.
    """
    kept, pos, comments_can_end = [], 0, True
    while match := _HIDDEN_BLOCK.search(html, pos):
        kept.append(html[pos : match.start()])
        if match[1] is None:  # a comment; searching from +2 makes "<!-->" an empty one
            end = _COMMENT_END.search(html, match.start() + 2) if comments_can_end else None
            comments_can_end = end is not None  # none further on either: do not rescan
            close = end.end() if end else html.find(">", match.end()) + 1
        else:
            end = _RAW_TEXT_END[match[1].lower()].search(html, match.end())
            close = html.find(">", end.end()) + 1 if end else 0
        pos = close if close > 0 else len(html)
    kept.append(html[pos:])
    return "".join(kept)


def _canonical_markup(match: re.Match[str]) -> str:
    """A tag as bare "<name>"/"</name>" (attributes are not needed); other markup as text or nothing."""
    if match[2] is None:
        return "&lt;" if match[0] == "<" else ""
    if not match[0].endswith(">"):
        return ""  # EOF inside the tag
    return f"<{match[1]}{_TAG_NAME.match(match[2].lower())[0]}>"
