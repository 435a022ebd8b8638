"""Reading a streamed reply off the event loop: one thread per reply, its pieces handed to the loop as they come."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio

_END = object()


class ReplyReader:
    """Reads a reply's pieces (a `TurnStream`) on a thread of its own and hands them to the event loop in batches.

    One thread per streamed reply, not a thread-pool hop per piece: every hop waited for the event loop and a pool
    thread to take the GIL in turn (up to its 5 ms switch interval each time), which put ~25 ms into an 11-piece
    reply and made the API's p95 overhead ~100 ms at 5 turns/s with the CPU idle (bench/api_load.py). Pieces that
    arrive while the loop is busy go out together. The reader also closes the stream, on its own thread, once the
    reply ends or the reader is stopped: a generator cannot be closed from another thread while it runs, and a
    turn closed before its end is stored as interrupted.
    """

    def __init__(self, pieces: Iterator[str], close: Callable[[], None]) -> None:
        self._pieces = pieces
        self._close = close
        self._stop = threading.Event()
        self._done = threading.Event()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._thread: threading.Thread | None = None

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        def hand(item: object) -> None:
            # RuntimeError: the loop is gone (the server is stopping), nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._queue.put_nowait, item)

        try:
            for piece in self._pieces:
                if self._stop.is_set():
                    return  # the client went away: the close below stores the turn as interrupted
                hand(piece)
            hand(_END)
        except BaseException as exc:  # raised to the reader of `batches`, on the loop
            hand(exc)
        finally:
            try:
                self._close()
            finally:
                self._done.set()

    async def batches(self) -> AsyncIterator[list[str]]:
        """The pieces as they arrive, in batches of whatever came while the loop was busy; a failure of the reply
        is raised here."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, args=(asyncio.get_running_loop(),), daemon=True)
            self._thread.start()
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch: list[str] = []
            for item in items:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, BaseException):
                    if batch:
                        yield batch
                    raise item
                batch.append(item)  # type: ignore[arg-type]
            yield batch

    async def stop(self) -> None:
        """Stop reading and wait until the stream is closed (its end stored), even when this task is being
        cancelled. A reader never started closes the stream here."""
        with anyio.CancelScope(shield=True):
            if self._thread is None:
                await anyio.to_thread.run_sync(self._close)
                return
            self._stop.set()
            await anyio.to_thread.run_sync(self._done.wait)
