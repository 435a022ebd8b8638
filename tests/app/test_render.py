"""Rendering rules for user and model text: Markdown images never make a viewer's browser fetch a URL.

Whether an image survives is asked of a CommonMark parser (markdown-it), the same kind of parser the browser's
renderer is, never of the function's own idea of the syntax.
"""

from __future__ import annotations

from html import escape

import pytest
from markdown_it import MarkdownIt

from app.rendering import highlight, plain_markdown, safe_markdown, safe_markdown_stream

_CHECK = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def _images(text: str) -> list[str]:
    return [
        child.attrs.get("src", "")  # type: ignore[misc]
        for token in _CHECK.parse(text)
        for child in token.children or ()
        if child.type == "image"
    ]


# Each of these is an image to a CommonMark renderer; the regex this replaced let the starred ones through.
IMAGES = [
    "See ![logo](http://evil.example/p.png)",
    "ref style ![x][ref]\n\n[ref]: http://evil.example/q.png",
    "collapsed ![ref][]\n\n[ref]: http://evil.example/q.png",
    "shortcut ![ref]\n\n[ref]: http://evil.example/q.png",
    "\\`![x](http://evil.example/a.png)\\`",  # * escaped backticks are no code span
    "`a`![x](http://evil.example/b.png)`",
    "[![badge](http://evil.example/c.png)](http://example.com)",  # an image inside a link
    "!![x](http://evil.example/d.png)",
    "| a | b |\n|---|---|\n| ![x](http://evil.example/e.png) | 1 |",  # in a table cell
    "> quoted ![x](http://evil.example/f.png)",
    "* item ![x](<http://evil.example/g h.png>)",
    "``` not a fence ``` ![x](http://evil.example/h.png)",
    '  ![x](http://evil.example/i.png "title")',
    "````\nfence ```\n````\n![x](http://evil.example/j.png)",  # * the regex ended the fence at ```
]


@pytest.mark.parametrize("text", IMAGES)
def test_no_image_survives(text: str) -> None:
    assert _images(text), "the case must be an image to begin with"
    out = safe_markdown(text)
    assert _images(out) == []
    # Only backslashes were added: the words and the URL stay readable as text.
    assert out.replace("\\", "") == text.replace("\\", "")


def test_code_is_left_alone() -> None:
    text = "Use `![alt](src)` in Markdown:\n```md\n![alt](src)\n```\nthen ![real](http://x/y.png)"
    out = safe_markdown(text)
    assert "`![alt](src)`" in out and "```md\n![alt](src)\n```" in out
    assert out.endswith("then \\![real](http://x/y.png)")


@pytest.mark.parametrize(
    "text",
    [
        "Hello! [a link](http://example.com) <b>not html</b> :red[colour] 100% sure!",
        "Already escaped: \\![x](http://example.com/a.png)",
        "Wow! [Great]",
    ],
)
def test_text_without_an_image_is_unchanged(text: str) -> None:
    assert safe_markdown(text) == text


def test_a_stream_is_safe_after_every_piece() -> None:
    pieces = ["Look", " !", "[pic](http://evil.example/p.png)", " and `code ", "![c](x)`", " done!"]
    shown = list(safe_markdown_stream(pieces))
    assert len(shown) == len(pieces)
    assert all(_images(s) == [] for s in shown)
    assert shown[-1] == "Look \\![pic](http://evil.example/p.png) and `code ![c](x)` done!"


@pytest.mark.parametrize(
    "text", ["**bold** _it_ `code` [l](http://x) ![i](http://x/i.png) <b>x</b> # h", ":red[colour] $x^2$ | a | b |"]
)
def test_plain_markdown_shows_the_text_as_typed(text: str) -> None:
    html = _CHECK.render(plain_markdown(text))
    assert html.strip() == f"<p>{escape(text, quote=False)}</p>".replace('"', "&quot;")
    assert _images(plain_markdown(text)) == []


def test_highlight_marks_each_match_and_escapes_the_rest() -> None:
    out = highlight("Flamingo *and* flamingos", "flamingo")
    assert out == ":orange-background[Flamingo] \\*and\\* :orange-background[flamingo]s"
