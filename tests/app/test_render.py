"""Rendering rules for user and model text: Markdown images never make a viewer's browser fetch a URL."""

from __future__ import annotations

from app.common import no_remote_images, no_remote_images_stream


def test_images_become_links_outside_code() -> None:
    text = "See ![logo](http://evil.example/p.png) and ![x][ref]\n\n[ref]: http://evil.example/q.png"
    out = no_remote_images(text)
    assert "![" not in out.replace("\\![", "")
    assert out.count("\\![") == 2


def test_code_is_left_alone() -> None:
    text = "Use `![alt](src)` in Markdown:\n```md\n![alt](src)\n```\nthen ![real](http://x/y.png)"
    out = no_remote_images(text)
    assert "`![alt](src)`" in out and "```md\n![alt](src)\n```" in out
    assert out.endswith("then \\![real](http://x/y.png)")


def test_plain_text_is_unchanged() -> None:
    text = "Hello! [a link](http://example.com) <b>not html</b> :red[colour] 100% sure!"
    assert no_remote_images(text) == text


def test_a_stream_split_between_bang_and_bracket_is_caught() -> None:
    pieces = ["Look", " !", "[pic](http://evil.example/p.png)", " done!"]
    out = "".join(no_remote_images_stream(pieces))
    assert out == "Look \\![pic](http://evil.example/p.png) done!"
    assert "".join(no_remote_images_stream(["Wow!", " Great"])) == "Wow! Great"
