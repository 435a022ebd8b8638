"""The embedded backend: llama-cpp-python over a GGUF file, in this process."""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, Token, Usage
from callbot_core.backends.llm.models import resolve_gguf_path
from callbot_core.errors import BackendError
from callbot_core.settings import Settings

# One loaded model per (file, context size) per process: loading costs memory, and the first call
# after a load is ~3x slower, so every later conversation should reuse a warmed model.
_models: dict[tuple[str, int], Any] = {}
# One lock per loaded model, shared by every backend object using it: a llama.cpp context is not
# thread-safe, and Streamlit serves sessions from several threads.
_model_locks: dict[tuple[str, int], threading.Lock] = {}
_models_lock = threading.Lock()


def _close_all() -> None:
    # Free models before interpreter shutdown: llama-cpp-python's __del__ fails noisily once the
    # C library's globals are already torn down.
    with _models_lock:
        for llm in _models.values():
            llm.close()
        _models.clear()


atexit.register(_close_all)


def load_llama(path: Path, n_ctx: int, n_threads: int | None = None) -> Any:
    """Load (once) and warm up a llama.cpp model."""
    key = (str(path), n_ctx)
    with _models_lock:
        llm = _models.get(key)
        if llm is None:
            from llama_cpp import Llama

            llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=n_threads or max(1, os.cpu_count() or 1),
                verbose=False,
            )
            # Warm-up: the first evaluation pays for buffer allocation; do it here, not in a user's turn.
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0)
            _models[key] = llm
            _model_locks[key] = threading.Lock()
        return llm


def model_lock(path: Path, n_ctx: int) -> threading.Lock:
    with _models_lock:
        return _model_locks.setdefault((str(path), n_ctx), threading.Lock())


class EmbeddedBackend:
    name = "embedded"
    # One llama.cpp context behind one lock: generations run one at a time (see `runs_serially`).
    serial = True

    def __init__(self, gguf_path: Path, *, n_ctx: int = 2048, n_threads: int | None = None) -> None:
        self._path = gguf_path
        self._n_ctx = n_ctx
        self._n_threads = n_threads

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedBackend:
        return cls(
            resolve_gguf_path(settings.gguf_path),
            n_ctx=settings.embedded_n_ctx,
            n_threads=settings.embedded_threads,
        )

    @property
    def where(self) -> str:
        return str(self._path)

    @property
    def default_model(self) -> str:
        return self._path.stem

    def _llm(self) -> Any:
        try:
            return load_llama(self._path, self._n_ctx, self._n_threads)
        except Exception as exc:  # llama.cpp raises ValueError/RuntimeError on a bad file
            raise BackendError(
                f"Embedded model {self._path} could not be loaded: {exc}", backend=self.name, where=self.where
            ) from exc

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]:
        if model and model != self.default_model:
            raise BackendError(
                f"The embedded backend serves only {self.default_model!r}, not {model!r}",
                backend=self.name,
                where=self.where,
            )
        llm = self._llm()
        payload = [{"role": m.role, "content": m.content} for m in messages]
        with model_lock(self._path, self._n_ctx):
            if params.seed is not None:
                # A seed asks for a reply that can be had again. Reusing the cached prompt prefix evaluates
                # only the new tokens, in smaller batches whose float sums round differently, which can flip
                # a near-tie; evaluating the whole prompt afresh makes the same seed give the same reply.
                llm.reset()
            started = time.perf_counter()
            try:
                chunks = llm.create_chat_completion(
                    messages=payload,
                    stream=True,
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_tokens,
                    stop=list(params.stop) or None,
                    seed=params.seed,
                )
                completion_tokens = 0
                finish_reason = None
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    text = choice.get("delta", {}).get("content")
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                    if text:
                        completion_tokens += 1
                        yield Token(text)
            except ValueError as exc:
                # llama.cpp raises ValueError when the prompt does not fit the context window.
                raise BackendError(
                    f"Embedded model {self.default_model}: {exc}", backend=self.name, where=self.where
                ) from exc
            # n_tokens counts what is in the KV cache now: the prompt plus the generated tokens.
            prompt_tokens = max(0, int(llm.n_tokens) - completion_tokens)
            total_ms = (time.perf_counter() - started) * 1000
        yield Token(
            "",
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                backend_total_ms=total_ms,
                finish_reason=finish_reason,
            ),
        )

    def list_models(self) -> list[str]:
        return [self.default_model]

    def health(self) -> Health:
        try:
            self._llm()
        except BackendError as exc:
            return Health(False, self.name, self.where, str(exc))
        return Health(True, self.name, self.where, f"{self.default_model} loaded (n_ctx={self._n_ctx})")

    def context_window(self, model: str | None = None) -> int:
        return self._n_ctx

    def count_tokens(self, text: str, model: str | None = None) -> int:
        if not text:
            return 0
        return len(self._llm().tokenize(text.encode("utf-8"), add_bos=False, special=False))
