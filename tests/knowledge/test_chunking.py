"""The recursive splitter: sizes, overlap, separators, sections, and linear time and bounded memory on huge input."""

from __future__ import annotations

import itertools
import random
import re
import time
import tracemalloc

import pytest

from callbot_core.knowledge.chunking import Chunk, chunk_document, chunk_text
from callbot_core.knowledge.documents import Document, Section, read_document

WORDS = ("the", "fee", "is", "due", "on", "the", "first", "day", "of", "each", "month", "unless", "your", "plan")
WORDS += ("says", "otherwise", "Zoë", "Müller", "Straße")


def random_text(rng: random.Random, words: int) -> str:
    """Words, sentences, lines and paragraphs in random lengths, with now and then a very long word."""
    out: list[str] = []
    for _ in range(words):
        roll = rng.random()
        if roll < 0.01:
            out.append("x" * rng.randint(50, 400))  # longer than many chunk sizes: forces the hard cut
        else:
            out.append(rng.choice(WORDS))
        roll = rng.random()
        out.append(
            ". " if roll < 0.08 else "\n" if roll < 0.11 else "\n\n" if roll < 0.13 else "  " if roll < 0.15 else " "
        )
    return "".join(out)


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def assert_covers(text: str, chunks: list[str]) -> None:
    """The chunks, their overlaps taken out, are the text (whitespace aside), in order, with no gap."""
    flat = squash(text)
    covered = 0
    for chunk in chunks:
        piece = squash(chunk)
        # It starts within what is covered already (the overlap) or right after it, never past a gap. The last such
        # place: in repetitive text ("yyyy...") an earlier copy would understate what is covered.
        at = flat.rfind(piece, max(0, covered - len(piece)), covered + len(piece))
        assert 0 <= at <= covered, f"chunk does not continue the text at {covered}: {chunk[:60]!r}"
        covered = max(covered, at + len(piece))
    assert covered == len(flat)


def test_random_texts_give_chunks_within_size_that_cover_the_text() -> None:
    rng = random.Random(20240601)
    for _ in range(150):
        text = random_text(rng, rng.randint(0, 600))
        size = rng.choice([1, 2, 7, 20, 50, 120, 300, 800])
        overlap = rng.randint(0, size - 1)
        chunks = list(chunk_text(text, size=size, overlap=overlap))
        assert all(0 < len(chunk) <= size for chunk in chunks), (size, overlap)
        assert all(chunk == chunk.strip() for chunk in chunks)
        assert_covers(text, chunks)


def test_each_chunk_starts_with_about_overlap_characters_of_the_one_before() -> None:
    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) + str(rng.randrange(10_000)) for _ in range(3000))  # words do not repeat
    chunks = list(chunk_text(text, size=200, overlap=50))
    assert len(chunks) > 50
    for before, after in zip(chunks, chunks[1:], strict=False):
        shared = next(k for k in range(min(len(before), len(after)), 0, -1) if before.endswith(after[:k]))
        assert 30 <= shared <= 50  # about the overlap, never more
        assert before[-shared - 1] == " "  # it starts at a word boundary: a whole word, not the tail of one


def test_no_overlap_gives_disjoint_chunks() -> None:
    text = "alpha beta gamma delta. " * 200
    chunks = list(chunk_text(text, size=100, overlap=0))
    assert squash("".join(chunks)) == squash(text)


def test_the_coarsest_separator_that_fits_wins() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 25 for i in range(6)]  # ~150 characters each
    text = "\n\n".join(p.strip() for p in paragraphs)
    chunks = list(chunk_text(text, size=400, overlap=0))
    # Two whole paragraphs fit in 400; a third does not: chunks end where paragraphs end.
    assert [chunk.count("Paragraph") for chunk in chunks] == [2, 2, 2]
    assert all(chunk.startswith("Paragraph") and chunk.endswith("word") for chunk in chunks)

    sentences = "One sentence here is short. " * 10 + "\n\n" + "Another one. " * 3
    for chunk in chunk_text(sentences, size=60, overlap=0):
        assert chunk.endswith("."), chunk  # a paragraph too long is cut at sentence ends, not mid-sentence


def test_a_word_longer_than_the_chunk_is_cut_anywhere() -> None:
    text = "short " + "y" * 250 + " tail"
    chunks = list(chunk_text(text, size=100, overlap=10))
    assert all(len(chunk) <= 100 for chunk in chunks)
    assert_covers(text, chunks)


def test_empty_and_blank_text_yield_nothing() -> None:
    assert list(chunk_text("", size=10, overlap=0)) == []
    assert list(chunk_text(" \n\n\t  \n", size=10, overlap=3)) == []
    assert list(chunk_text("hi", size=10, overlap=3)) == ["hi"]


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [
        (100, 100, "overlap must be a whole number from 0 to below the chunk size (100), not 100"),
        (100, 150, "below the chunk size (100), not 150"),
        (100, -1, "not -1"),
        (0, 0, "chunk size must be a whole number of characters, at least 1, not 0"),
        (10.5, 0, "not 10.5"),
    ],
)
def test_bad_size_or_overlap_is_refused_at_the_call(size: object, overlap: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        chunk_text("text", size=size, overlap=overlap)  # type: ignore[arg-type]  # no next(): raised eagerly
    with pytest.raises(ValueError, match=re.escape(message)):
        chunk_document(Document("a.txt", "txt", "0", [Section("text")]), size=size, overlap=overlap)  # type: ignore[arg-type]


def test_chunk_document_keeps_sections_apart_and_counts_positions_across_them() -> None:
    document = Document(
        name="fees.pdf",
        format="pdf",
        content_hash="0" * 64,
        sections=[
            Section("First page. " * 20, page=1),
            Section("Second page is short.", page=2),
            Section("Under a heading. " * 10, heading="Fees > Insurance"),
        ],
    )
    chunks = list(chunk_document(document, size=80, overlap=20))
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))
    by_section = [(c.page, c.heading) for c in chunks]
    assert [key for key, _ in itertools.groupby(by_section)] == [(1, None), (2, None), (None, "Fees > Insurance")]
    assert Chunk("Second page is short.", by_section.index((2, None)), 2, None) in chunks  # alone: no overlap
    assert all("First" not in c.text for c in chunks if c.page != 1)
    assert all(len(c.text) <= 80 for c in chunks)


def _peak_while_consuming(text: str, size: int, overlap: int) -> tuple[int, int, float]:
    tracemalloc.start()
    began = time.perf_counter()
    count = 0
    for _chunk in chunk_text(text, size=size, overlap=overlap):
        count += 1  # consumed, not kept
    took = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, count, took


@pytest.mark.parametrize("spaces", [True, False], ids=["words", "no-spaces"])
def test_five_megabytes_on_one_line_in_linear_time_and_bounded_memory(spaces: bool) -> None:
    rng = random.Random(5)
    if spaces:
        words = [rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(1000)]
        text = " ".join(rng.choice(words) for _ in range(700_000))[: 5 * 1024 * 1024]
    else:
        text = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=5 * 1024 * 1024))
    assert "\n" not in text and len(text) == 5 * 1024 * 1024

    peak, count, took = _peak_while_consuming(text, 800, 100)
    assert count >= len(text) // 800
    assert peak < 3 * len(text)  # measured here: well under 100 KB, nothing proportional to the text
    assert took < 5

    chunks = list(chunk_text(text, size=800, overlap=100))
    assert max(map(len, chunks)) <= 800
    assert_covers(text, chunks)


def test_a_csv_with_a_one_megabyte_field_is_chunked_in_bounded_memory() -> None:
    rng = random.Random(11)
    field = " ".join(rng.choice(WORDS) for _ in range(200_000))[: 1024 * 1024]
    data = ('id,question,answer\n1,"What is the fee?","' + field + '"\n2,Short,Row\n').encode()
    document = read_document("faq.csv", data, max_bytes=4 * 1024 * 1024)
    text = document.sections[0].text
    assert len(text) > len(field)

    tracemalloc.start()
    count = sum(1 for _chunk in chunk_document(document, size=800, overlap=100))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count > len(field) // 800
    assert peak < 3 * len(data)

    chunks = [chunk.text for chunk in chunk_document(document, size=800, overlap=100)]
    assert_covers(text, chunks)
    assert chunks[0].startswith("id: 1; question: What is the fee?; answer: ")
    assert chunks[-1].endswith("id: 2; question: Short; answer: Row")
