"""A fast LLM backend for engine tests: fixed pieces streamed at once, optionally failing part way."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from callbot_core.backends.llm import ChatMessage, GenerationParams, Health, Token, Usage
from callbot_core.backends.llm.base import estimate_tokens
from callbot_core.errors import BackendUnavailable


class Scripted:
    """Streams fixed pieces at once; `fail_after=n` raises after n pieces, as a server that went away.

    `requests` and `params` record what each call was given. With `gate` set, every piece after the first waits
    (up to 10 s) for the event: a slow server whose pace a test controls.
    """

    name = "scripted"
    where = "this process"
    default_model = "script-1"

    def __init__(self) -> None:
        self.pieces: tuple[str, ...] = ("We", " open", " at", " 8.")
        self.fail_after: int | None = None
        self.requests: list[list[ChatMessage]] = []
        self.params: list[GenerationParams] = []
        self.gate: threading.Event | None = None

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]:
        self.requests.append(list(messages))
        self.params.append(params)
        for index, piece in enumerate(self.pieces):
            if index and self.gate is not None:
                self.gate.wait(timeout=10)
            if index == self.fail_after:
                raise BackendUnavailable("the scripted server went away", backend=self.name, where=self.where)
            yield Token(piece)
        yield Token("", usage=Usage(prompt_tokens=sum(estimate_tokens(m.content) for m in messages)))

    def list_models(self) -> list[str]:
        return [self.default_model]

    def health(self) -> Health:
        return Health(True, self.name, self.where)

    def context_window(self, model: str | None = None) -> int:
        return 4096

    def count_tokens(self, text: str, model: str | None = None) -> int:
        return estimate_tokens(text)
