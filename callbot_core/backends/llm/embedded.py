"""The embedded backend: llama-cpp-python over a GGUF file, in this process."""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, Token, Usage
from callbot_core.backends.llm.models import resolve_gguf_path
from callbot_core.errors import BackendError
from callbot_core.settings import Settings


class ModelThread:
    """One loaded model and the one thread that runs it: loading, warm-up and every generation.

    A llama.cpp context is not thread-safe, so generations must run one at a time anyway; running them all on one
    thread also keeps llama.cpp's OpenMP worker team to one per model. Called from whatever thread asked (the API's
    thread pool hands each step of a streamed reply to any of its threads), every new calling thread got a team of
    its own, and the idle teams spinning beside the busy one cost ~80 ms of time to first token on two cores.
    """

    def __init__(self, path: Path, n_ctx: int, n_threads: int | None) -> None:
        self.path, self.n_ctx, self.n_threads = path, n_ctx, n_threads
        self.llm: Any = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"llama:{path.stem}", daemon=True)
        self._thread.start()

    def _load(self) -> Any:
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(self.path),
            n_ctx=self.n_ctx,
            n_threads=self.n_threads or max(1, os.cpu_count() or 1),
            verbose=False,
        )
        # Warm-up: the first evaluation pays for buffer allocation; do it here, not in a user's turn.
        llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0.0)
        return llm

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, done = job
            if not done.set_running_or_notify_cancel():
                continue  # the caller gave up while it waited its turn
            try:
                if self.llm is None:
                    self.llm = self._load()
                done.set_result(work(self.llm))
            except BaseException as exc:  # handed to the caller, who raises it in its own thread
                done.set_exception(exc)

    def submit(self, work: Callable[[Any], Any]) -> Future[Any]:
        """Run `work(llm)` on the model's thread after the jobs before it; the model is loaded first if need be."""
        done: Future[Any] = Future()
        self._jobs.put((work, done))
        return done

    def loaded(self) -> Any:
        """The model, loaded (once) and warmed up on its thread."""
        return self.llm if self.llm is not None else self.submit(lambda llm: llm).result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
        if self.llm is not None:
            self.llm.close()
            self.llm = None


# One model thread per (file, context size) per process: loading costs memory, and the first call after a load is
# ~3x slower, so every later conversation should reuse a warmed model.
_threads: dict[tuple[str, int], ModelThread] = {}
_threads_lock = threading.Lock()


def _close_all() -> None:
    # Free models before interpreter shutdown: llama-cpp-python's __del__ fails noisily once the
    # C library's globals are already torn down.
    with _threads_lock:
        for model in _threads.values():
            model.close()
        _threads.clear()


atexit.register(_close_all)


def model_thread(path: Path, n_ctx: int, n_threads: int | None = None) -> ModelThread:
    """The thread serving this model file at this context size (started on first use; the model loads lazily)."""
    key = (str(path), n_ctx)
    with _threads_lock:
        model = _threads.get(key)
        if model is None:
            model = _threads[key] = ModelThread(path, n_ctx, n_threads)
        return model


# What a generation job hands the caller's side after its last token.
_END = object()


class EmbeddedBackend:
    name = "embedded"
    # One llama.cpp context on one thread: generations run one at a time (see `runs_serially`).
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

    def _model(self) -> ModelThread:
        return model_thread(self._path, self._n_ctx, self._n_threads)

    def _llm(self) -> Any:
        try:
            return self._model().loaded()
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
        self._llm()  # a model that cannot load is a clear error before anything is queued
        payload = [{"role": m.role, "content": m.content} for m in messages]
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stopped = threading.Event()

        def generate(llm: Any) -> None:
            # Runs on the model's thread; tokens reach the caller through `out` as they come.
            if params.seed is not None:
                # A seed asks for a reply that can be had again. Reusing the cached prompt prefix evaluates
                # only the new tokens, in smaller batches whose float sums round differently, which can flip
                # a near-tie; evaluating the whole prompt afresh makes the same seed give the same reply.
                llm.reset()
            started = time.perf_counter()
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
                if stopped.is_set():
                    return  # the caller stopped reading: free the model for the next in line
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
                if text:
                    completion_tokens += 1
                    out.put(Token(text))
            # n_tokens counts what is in the KV cache now: the prompt plus the generated tokens.
            prompt_tokens = max(0, int(llm.n_tokens) - completion_tokens)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                backend_total_ms=(time.perf_counter() - started) * 1000,
                finish_reason=finish_reason,
            )
            out.put(Token("", usage=usage))

        job = self._model().submit(generate)
        job.add_done_callback(lambda _: out.put(_END))
        try:
            while (item := out.get()) is not _END:
                yield item
            failure = job.exception()
        finally:
            stopped.set()
            job.cancel()  # still waiting its turn: never runs
        if isinstance(failure, ValueError):
            # llama.cpp raises ValueError when the prompt does not fit the context window.
            raise BackendError(
                f"Embedded model {self.default_model}: {failure}", backend=self.name, where=self.where
            ) from failure
        if failure is not None:
            raise failure

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
