"""Knowledge fixtures: a knowledge base over the test store, with the real embedded Chroma under the test's runtime
folder and, for tests that are not about the model, a small bag-of-words embedder registered through the real
registry (as simonw/llm's tests register a fake model)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from callbot_core.backends.embeddings import embedders
from callbot_core.backends.vectors.chroma import close_persistent_clients
from callbot_core.knowledge.index import KnowledgeBase, SourceFile
from callbot_core.settings import Settings
from callbot_core.store import Store
from tests.chroma_server import chroma_url  # noqa: F401  (the session's `chroma run` server)

BOW = "test-bow"
STOPWORDS = {"the", "and", "for", "are", "you", "our", "can", "with", "from", "this", "that", "your"}
SAMPLES = Path(__file__).resolve().parents[2] / "data" / "knowledge"


class BagOfWords:
    """Words hashed into 256 buckets, normalised: texts sharing words are similar, others are not. Deterministic and
    instant; it stands in only where the test is about what the engine does with vectors, not about meaning."""

    name = BOW
    dimensions = 256

    def __init__(self) -> None:
        self.calls: list[int] = []  # how many texts each embed() call got: the cache is tested by it

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls.append(len(texts))
        out = []
        for text in texts:
            vector = [0.0] * self.dimensions
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if len(word) > 2 and word not in STOPWORDS:
                    vector[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dimensions] += 1.0
            norm = math.sqrt(sum(v * v for v in vector)) or 1.0
            out.append([v / norm for v in vector])
        return out


@pytest.fixture
def bow() -> Iterator[BagOfWords]:
    model = BagOfWords()
    embedders.register(BOW, lambda settings: model)
    yield model
    embedders.unregister(BOW)


@pytest.fixture
def kb_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"embedder": BOW})


@pytest.fixture
def kb(store: Store, kb_settings: Settings, bow: BagOfWords) -> Iterator[KnowledgeBase]:
    yield KnowledgeBase(store, kb_settings)
    # Each test's Chroma folder is its own: close its client (threads, open files) instead of keeping it all run.
    close_persistent_clients()


def text_file(name: str, text: str) -> SourceFile:
    return SourceFile(name, data=text.encode("utf-8"))


CLINIC_TEXTS = {
    "hours.md": "# Opening hours\n\n## Weekdays\n\nMonday to Friday we are open from 8:00 to 18:00.\n\n"
    "## Saturday\n\nOn Saturday the clinic opens 9:00 to 13:00 for urgent appointments only.\n",
    "fees.txt": "A standard consultation costs 80 euros. A missed appointment without notice costs a no-show fee "
    "of 30 euros.\n\nWe accept cards and bank transfer.",
    "parking.txt": "Parking is free in the courtyard behind the building. Bicycles go in the rack by the door.",
}


@pytest.fixture
def clinic(kb: KnowledgeBase) -> KnowledgeBase:
    from callbot_core.access.permissions import LOCAL_OPERATOR

    outcomes = kb.ingest("clinic", [text_file(n, t) for n, t in CLINIC_TEXTS.items()], actor=LOCAL_OPERATOR)
    assert [o.status for o in outcomes] == ["ingested"] * 3, outcomes
    return kb
