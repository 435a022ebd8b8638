"""ReplyReader: a streamed reply read on one thread of its own, handed to the event loop, closed on that thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from callbot_core.api.streaming import ReplyReader


class Reply:
    """A generator-backed reply that records the threads it was read and closed on."""

    def __init__(self, pieces: list[str], fail_at: int | None = None, gate: threading.Event | None = None) -> None:
        self.read_on: set[int] = set()
        self.closed_on: list[int] = []
        self._gen = self._run(pieces, fail_at, gate)

    def _run(self, pieces: list[str], fail_at: int | None, gate: threading.Event | None) -> Iterator[str]:
        for n, piece in enumerate(pieces):
            self.read_on.add(threading.get_ident())
            if fail_at == n:
                raise RuntimeError("the backend went away")
            if gate is not None and n == 1:
                gate.wait(5)
            yield piece

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def close(self) -> None:
        self.closed_on.append(threading.get_ident())
        self._gen.close()  # raises "generator already executing" if called from another thread mid-read


def _read_all(reader: ReplyReader) -> list[list[str]]:
    async def run() -> list[list[str]]:
        try:
            return [batch async for batch in reader.batches()]
        finally:
            await reader.stop()

    return asyncio.run(run())


def test_every_piece_arrives_in_order_read_and_closed_off_the_loop() -> None:
    reply = Reply([f"p{n}" for n in range(50)])
    batches = _read_all(ReplyReader(iter(reply), reply.close))
    assert [p for batch in batches for p in batch] == [f"p{n}" for n in range(50)]
    assert len(reply.read_on) == 1 and threading.get_ident() not in reply.read_on
    assert reply.closed_on == list(reply.read_on)  # closed once, on the reading thread


def test_a_failure_is_raised_to_the_reader_after_the_pieces_before_it() -> None:
    reply = Reply(["a", "b", "c"], fail_at=2)
    reader = ReplyReader(iter(reply), reply.close)
    got: list[str] = []

    async def run() -> None:
        try:
            async for batch in reader.batches():
                got.extend(batch)
        finally:
            await reader.stop()

    with pytest.raises(RuntimeError, match="went away"):
        asyncio.run(run())
    assert got == ["a", "b"] and len(reply.closed_on) == 1


def test_stopping_mid_reply_closes_the_stream_on_its_own_thread() -> None:
    gate = threading.Event()
    reply = Reply(["a", "b", "c", "d"], gate=gate)
    reader = ReplyReader(iter(reply), reply.close)

    async def run() -> list[str]:
        batches = reader.batches()
        first = await batches.__anext__()  # "a" arrived; the reader now waits inside the reply for "b"
        gate.set()
        await reader.stop()  # the client went away
        return first

    assert asyncio.run(run()) == ["a"]
    assert reply.closed_on == list(reply.read_on)  # no "generator already executing"


def test_a_reader_never_started_still_closes_the_stream() -> None:
    reply = Reply(["a"])
    asyncio.run(ReplyReader(iter(reply), reply.close).stop())
    assert len(reply.closed_on) == 1
