"""Backend test fixtures: a real Chroma server for the vector store tests (shared with other folders through
tests/chroma_server.py)."""

from __future__ import annotations

from tests.chroma_server import chroma_url  # noqa: F401  (the session's `chroma run` server)
