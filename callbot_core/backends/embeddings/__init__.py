"""Sentence embeddings: the `Embedder` protocol, its registry, and cosine similarity.

Embedders register like every backend (entry points `embeddings.NAME` in `callbot.backends`); the configured one
(`CALLBOT_EMBEDDER`, default `minilm`) serves scenario suites' `similar_to` today and retrieval later. An embedder
has a name and a number of dimensions, so a collection can record which one made its vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from callbot_core.registry import Registry
from callbot_core.settings import Settings, get_settings


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors of `dimensions` floats; any implementation (a remote service, a fake) can stand in."""

    name: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


embedders: Registry[Embedder] = Registry("embeddings", what="embedder")


def get_embedder(name: str | None = None, settings: Settings | None = None) -> Embedder:
    """The embedder called `name` (default: the configured one), built once per settings object."""
    settings = settings or get_settings()
    return embedders.get(name or settings.embedder, settings)


def default_embedder() -> Embedder:
    """The configured embedder for the process settings, loaded on first use."""
    return get_embedder()


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
