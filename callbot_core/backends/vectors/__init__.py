"""Vector stores: the `VectorStore` protocol, its registry, and what a query returns.

A vector store keeps vectors we computed ourselves (with an `Embedder`) under string ids, in named collections, and
answers nearest-neighbour queries with a similarity in [0, 1] (higher is better). A collection records which
embedder made it (name and dimensions), so vectors from two embedders are never compared. Stores register like
every backend (entry points `vectors.NAME` in `callbot.backends`); the configured one is `CALLBOT_VECTOR_STORE`
(default `chroma`: embedded under the runtime folder, or a server when `CALLBOT_CHROMA_URL` is set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from callbot_core.errors import Conflict
from callbot_core.registry import Registry
from callbot_core.settings import Settings, get_settings

__all__ = ["EmbedderMismatch", "VectorHit", "VectorStore", "get_vector_store", "vector_stores"]


@dataclass(frozen=True, slots=True)
class VectorHit:
    id: str
    similarity: float  # cosine similarity clamped to [0, 1]; higher is better


class EmbedderMismatch(Conflict):
    """A collection was made by another embedder (name or dimensions) than the one asked for: its vectors and ours
    would not be comparable."""


@runtime_checkable
class VectorStore(Protocol):
    """Named collections of our own vectors; any implementation (a server, a fake) can stand in.

    Collection names are validated by the caller: `[a-z0-9][a-z0-9_-]{0,61}`.
    """

    name: str  # the registry name: "chroma"
    where: str  # the folder or the URL, for error messages

    def open_collection(self, collection: str, *, embedder: str, dimensions: int) -> None:
        """Create the collection if missing, recording `embedder` and `dimensions`; raise `EmbedderMismatch` (naming
        both) if it exists with another embedder or dimensions."""
        ...

    def add(self, collection: str, ids: Sequence[str], vectors: Sequence[Sequence[float]]) -> None:
        """Insert or replace vectors by id, in as many batches as the store needs."""
        ...

    def delete(self, collection: str, ids: Sequence[str]) -> None:
        """Remove vectors by id; unknown ids are ignored."""
        ...

    def query(self, collection: str, vector: Sequence[float], k: int) -> list[VectorHit]:
        """The `k` nearest vectors, best first (fewer when the collection holds fewer)."""
        ...

    def count(self, collection: str) -> int: ...

    def drop(self, collection: str) -> None:
        """Delete the collection and its vectors; a missing one is fine."""
        ...

    def collections(self) -> list[str]:
        """Our collection names, sorted."""
        ...

    def health(self) -> None:
        """Return when the store answers; raise `BackendUnavailable` (or `BackendTimeout`) when it does not."""
        ...


vector_stores: Registry[VectorStore] = Registry("vectors", what="vector store")


def get_vector_store(name: str | None = None, settings: Settings | None = None) -> VectorStore:
    """The vector store called `name` (default: the configured one), built once per settings object."""
    settings = settings or get_settings()
    return vector_stores.get(name or settings.vector_store, settings)


def _lazy_chroma(settings: Settings) -> VectorStore:
    # Imported on first use: chromadb takes about a second to import, and most commands never touch vectors.
    from callbot_core.backends.vectors.chroma import ChromaVectorStore

    return ChromaVectorStore.from_settings(settings)


# The built-in store is the entry point `vectors.chroma` (pyproject.toml), but entry points are read from the installed
# metadata: an environment installed before that line was added does not have it. `register()` always replaces a name
# (it loads the entry points first, then overwrites), so registering unconditionally would also shadow a plugin that
# ships its own `vectors.chroma`; registering only when the name is missing keeps entry points in charge and is a
# no-op once the package is reinstalled. (It reads the entry points now rather than on first use: ~40 ms, once.)
if "chroma" not in vector_stores.names():
    vector_stores.register("chroma", _lazy_chroma)
