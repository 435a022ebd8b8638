"""Text that someone else wrote (a caller, a model, another user's persona or saved query) made safe to show as
Markdown.

Streamlit renders Markdown without raw HTML unless `unsafe_allow_html=True`, which this app never passes: a
`<script>` in a reply is shown as text (tests/browser checks it in chromium). Escaping HTML ourselves as well would
show `&lt;` literally inside code blocks. Markdown images are the one thing left that makes a viewer's browser fetch
a URL that someone else wrote (a tracking pixel, a request into the viewer's network), so they are turned into
plain text.

Which `![` starts an image is the parser's decision, not a regex's: escaped backticks, code spans of several
backticks, reference-style images and images inside links all fool a pattern. So the text is parsed with
markdown-it (CommonMark, as the browser's renderer is) and a backslash is put before exactly those `!` whose
removal makes an image token go away; text with no image comes back unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from markdown_it import MarkdownIt

# "gfm-like" also parses tables and strikethrough, as Streamlit's renderer does; raw HTML stays off (it is never
# rendered anyway, and parsing it would hide images written inside it from the count below).
_PARSER = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def _image_count(text: str) -> int:
    count = 0
    for token in _PARSER.parse(text):
        for child in token.children or ():
            if child.type == "image":
                count += 1
    return count


def safe_markdown(text: str) -> str:
    """`text` as Markdown that shows no image: each image's `!` is escaped, so `![alt](url)` reads as `!` + a link."""
    if "![" not in text or not (images := _image_count(text)):
        return text
    out = text
    start = 0
    while images:
        at = out.find("![", start)
        if at < 0:
            # An image the parser sees whose `!` and `[` are not side by side cannot exist in CommonMark; if it
            # ever does, show the text with every `!` escaped rather than risk the image.
            return text.replace("!", "\\!")
        candidate = out[:at] + "\\" + out[at:]
        fewer = _image_count(candidate)
        if fewer < images:
            out, images = candidate, fewer
            start = at + 3
        else:
            # This `![` sits in a code span or block (or is already escaped): it shows as typed; leave it.
            start = at + 2
    return out


def safe_markdown_stream(pieces: Iterable[str]) -> Iterator[str]:
    """The accumulated text after each piece, made safe: a stream can only be judged as a whole (a later backtick
    can turn an earlier image into code), so callers show each yield in place of the previous one."""
    text = ""
    for piece in pieces:
        text += piece
        yield safe_markdown(text)


_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def plain_markdown(text: str) -> str:
    """`text` to be shown literally inside Markdown: every ASCII punctuation character backslash-escaped (CommonMark
    allows that for all of them), so no emphasis, link, image, code, directive (`:red[…]`) or formula can form."""
    return "".join(f"\\{c}" if c in _PUNCTUATION else c for c in text)


def highlight(text: str, query: str) -> str:
    """`text` shown literally, with each case-insensitive occurrence of `query` highlighted (a search snippet)."""
    if not query:
        return plain_markdown(text)
    out, lower, needle, at = [], text.lower(), query.lower(), 0
    while (found := lower.find(needle, at)) >= 0:
        out.append(plain_markdown(text[at:found]))
        out.append(f":orange-background[{plain_markdown(text[found : found + len(query)])}]")
        at = found + len(query)
    out.append(plain_markdown(text[at:]))
    return "".join(out)
