"""Chunks for retrieval: a recursive character splitter with overlap, linear in time and bounded in memory.

Text is cut at the coarsest separator that keeps pieces small enough (paragraphs, then lines, sentences, words, and
as a last resort anywhere), and pieces are merged greedily up to the chunk size. Each chunk after the first repeats
about `overlap` characters of the one before, so a sentence cut at a boundary is still whole in one of them.

Everything works on positions in the one string: no list of pieces, no concatenation. A 5 MB text on one line costs
a few scans of it and one chunk's worth of memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from callbot_core.knowledge.documents import Document

# Coarsest first. A separator stays with the text before it, so the pieces put back together are the text.
_SEPARATORS: tuple[tuple[str, ...], ...] = (("\n\n",), ("\n",), (". ", "? ", "! "), (" ", "\t"))
_FIRST_SEPARATOR = tuple(re.compile("|".join(map(re.escape, level))) for level in _SEPARATORS)
_NON_BLANK = re.compile(r"\S")
_BLANK = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Chunk:
    text: str
    position: int  # 0-based order of the chunk in the document
    page: int | None
    heading: str | None


def chunk_document(document: Document, *, size: int, overlap: int) -> Iterator[Chunk]:
    """Chunks of each section in turn: a chunk never spans two sections (pages, headings) and keeps its section's."""
    _check(size, overlap)  # now, not at the first next(): the caller's mistake shows where it was made
    return _document_chunks(document, size, overlap)


def chunk_text(text: str, *, size: int, overlap: int) -> Iterator[str]:
    """Chunks of at most `size` characters, each after the first starting with about `overlap` from the one before."""
    _check(size, overlap)
    return _chunks(text, size, overlap)


def _check(size: int, overlap: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"chunk size must be a whole number of characters, at least 1, not {size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
        raise ValueError(
            f"chunk overlap must be a whole number from 0 to below the chunk size ({size}), not {overlap!r}"
        )


def _document_chunks(document: Document, size: int, overlap: int) -> Iterator[Chunk]:
    position = 0
    for section in document.sections:
        for text in _chunks(section.text, size, overlap):
            yield Chunk(text=text, position=position, page=section.page, heading=section.heading)
            position += 1


def _chunks(text: str, size: int, overlap: int) -> Iterator[str]:
    # Pieces leave room for the overlap, so the overlap plus the next piece always fits in a chunk.
    limit = size - overlap
    start = 0  # where the current chunk begins: inside the previous chunk, by the overlap
    fresh = False  # whether the current chunk has non-blank text beyond the overlap
    for piece_start, piece_end in _pieces(text, 0, len(text), limit, 0):
        if piece_end - start > size:
            if fresh:
                yield text[start:piece_start].strip()
                start = _overlap_start(text, start, piece_start, overlap)
            else:
                start = piece_start  # only the overlap and blanks so far: not worth a chunk of their own
            fresh = False
        if not fresh and _NON_BLANK.search(text, piece_start, piece_end):
            fresh = True
    if fresh:
        yield text[start:].strip()


def _pieces(text: str, start: int, end: int, limit: int, level: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive pieces of text[start:end], each at most `limit` long.

    At each level, cutting at the last separator that fits in the window is the split-then-merge-greedily of the
    recursive splitter without building the list; a stretch with no separator in the window goes one level down.
    Each level scans a character a bounded number of times, so the whole is linear.
    """
    if level == len(_SEPARATORS):
        for cut in range(start, end, limit):  # no separator at all: cut anywhere
            yield cut, min(cut + limit, end)
        return
    separators = _SEPARATORS[level]
    while end - start > limit:
        window = start + limit
        cut = -1
        for separator in separators:
            found = text.rfind(separator, start, window)
            if found >= 0:
                cut = max(cut, found + len(separator))
        if cut > start:
            yield start, cut
            start = cut
            continue
        # No separator of this level inside the window: the stretch up to the next one is too long, go finer.
        match = _FIRST_SEPARATOR[level].search(text, start, end)
        stop = match.end() if match else end
        yield from _pieces(text, start, stop, limit, level + 1)
        start = stop
    if start < end:
        yield start, end


def _overlap_start(text: str, start: int, end: int, overlap: int) -> int:
    """Where the overlap copied from text[start:end] begins: about `overlap` characters before `end`, moved forward
    to the start of a word when it would begin inside one (and there is a word boundary to move to)."""
    begin = max(start, end - overlap)
    if start < begin < end and not text[begin - 1].isspace() and not text[begin].isspace():
        blank = _BLANK.search(text, begin, end)
        if blank:
            begin = blank.end()
    return begin
