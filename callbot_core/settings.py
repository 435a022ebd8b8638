"""One settings object, read once from `CALLBOT_*` environment variables and a `.env` file."""

from __future__ import annotations

import os
import secrets
import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from callbot_core.errors import ConfigError


def _base_dir() -> Path:
    """Where relative paths in the settings point.

    In a source checkout, its root: `.venv/bin/callbot` finds the same store from any directory. Installed from a
    wheel (a container image) there is no checkout, and relative paths mean the working directory, as anywhere.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "callbot_core" / "__init__.py").is_file():
        return root
    return Path.cwd()


PROJECT_ROOT = _base_dir()
DATABASE_FILE = "callbot.db"

SECRET_KEY_FILE = "secret_key"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CALLBOT_", env_file=".env", env_file_encoding="utf-8", extra="ignore")

    env: Literal["development", "production", "test"] = "development"
    runtime_dir: Path = Path("data/runtime")
    # Default: a SQLite file inside the runtime folder, so all runtime state lives under one setting.
    database_url: str | None = None
    secret_key: SecretStr | None = None
    # bcrypt's cost for new password hashes (2^rounds iterations; ~0.4 s at 12 here). Tests lower it to 4.
    bcrypt_rounds: int = Field(12, ge=4, le=16)
    # The `admin` account's password when `callbot app` creates it; otherwise one is generated and printed once.
    admin_password: SecretStr | None = None
    # Reverse proxies whose X-Forwarded-For is believed (addresses or networks, comma separated in the environment):
    # sign-in throttling then counts the real client, not the proxy everyone shares.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The HTTP API (`callbot api`): the largest request body it reads.
    api_max_body_bytes: int = Field(1_048_576, ge=1024)
    # Document uploads (POST /v1/knowledge/{collection}/documents) carry files, so they get a limit of their own.
    api_max_upload_bytes: int = Field(104_857_600, ge=1024)
    # Redis (e.g. redis://127.0.0.1:6379/0): live events across processes, shared rate limits, the response cache.
    # Unset: all three stay in the process.
    redis_url: str | None = None
    # Every Redis key and channel starts with this (live events: "{prefix}:conversation:{id}"), so several
    # workbenches, or test runs, can share one Redis without hearing each other.
    redis_key_prefix: str = Field("callbot", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    # The Streamlit process serves its Prometheus metrics on this port (127.0.0.1 only) when set.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # Structured logs leave message text out unless this is true.
    log_content: bool = False
    # Rate limits of the API (access/limits.py): requests per window, per client address and per API key (or user,
    # for a token), for each group of routes; 0 turns that one off. Shared by replicas through Redis when redis_url
    # is set. Sign-in is POST /v1/auth/token: its lockout stops guessing one account, this stops one address
    # trying many.
    rate_limit_signin_per_client: int = Field(10, ge=0)
    rate_limit_signin_window_s: int = Field(60, ge=1)
    # Making API keys (POST /v1/apikeys): admins only, so a flood here is a stolen credential or a runaway script.
    rate_limit_keys_per_client: int = Field(30, ge=0)
    rate_limit_keys_per_key: int = Field(10, ge=0)
    rate_limit_keys_window_s: int = Field(60, ge=1)
    # Chat (turns and /v1/chat/completions): each one occupies the model, the scarce thing on one machine.
    rate_limit_chat_per_client: int = Field(120, ge=0)
    rate_limit_chat_per_key: int = Field(60, ge=0)
    rate_limit_chat_window_s: int = Field(60, ge=1)
    # Replay a seeded deterministic turn's reply from Redis instead of asking the backend again
    # (conversations/cache.py). Opt-in: a cached reply hides a backend's own variation; needs redis_url.
    response_cache: bool = False
    # How long a cached reply is kept: long enough for a suite replayed through a working day.
    response_cache_ttl_s: int = Field(86_400, ge=1)

    llm_backend: str = "embedded"
    llm_model: str | None = None
    gguf_path: Path | None = None
    # Context window of the embedded model; remote backends do not report theirs, so we assume one.
    embedded_n_ctx: int = Field(2048, ge=256)
    remote_context_window: int = Field(4096, ge=256)
    embedded_threads: int | None = None

    # Sentence embeddings (suites' similar_to; retrieval): a name in the backend registry.
    embedder: str = "minilm"

    # Knowledge (callbot_core/knowledge). Vectors live in a `vector_store` from the registry: Chroma embedded under
    # the runtime folder, or a Chroma server when chroma_url is set.
    vector_store: str = "chroma"
    chroma_url: str | None = None
    # A file bigger than this is refused before it is read.
    knowledge_max_file_mb: float = Field(20.0, gt=0)
    # Chunks are measured in characters (about 4 per token for English): 800 fits a handful in a small context.
    knowledge_chunk_size: int = Field(800, ge=100, le=20_000)
    knowledge_chunk_overlap: int = Field(100, ge=0, le=5_000)
    # A retrieval whose best vector similarity is under this is flagged low_relevance: the documents probably do
    # not answer the question.
    knowledge_low_relevance: float = Field(0.35, ge=0, le=1)

    ollama_url: str = "http://127.0.0.1:11434"
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr | None = None

    llm_connect_timeout_s: float = Field(5.0, gt=0)
    # Longest silence allowed between two chunks of a stream (and before the first one).
    llm_read_timeout_s: float = Field(60.0, gt=0)

    max_message_chars: int = Field(8000, ge=1)

    # A folder of your own scenario suites, listed on the Personas page instead of the shipped ones.
    suites_dir: Path | None = None
    # Another schedule for `callbot pipelines` than the shipped one (callbot_core/jobs/schedules.yaml).
    schedules_file: Path | None = None
    # `callbot` acts as this stored user (their role applies, their name goes in the audit log) instead of the
    # local operator; `callbot --as USERNAME` overrides it. Not a sign-in: whoever runs the CLI can read the store
    # anyway; it is for acting with a smaller role and for attribution.
    cli_user: str | None = None

    # Backend instances built from these settings (see registry.py): they live and die with this object.
    _backends: dict[tuple[str, str], tuple[object, object]] = PrivateAttr(default_factory=dict)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    def backend_cache(self) -> dict[tuple[str, str], tuple[object, object]]:
        return self._backends

    def resolved_runtime_dir(self) -> Path:
        """The one folder that holds runtime state: the SQLite store, the secret, reports, the analytics snapshot."""
        return self.runtime_dir if self.runtime_dir.is_absolute() else PROJECT_ROOT / self.runtime_dir

    def resolved_database_url(self) -> str:
        """The database URL: the configured one with a relative SQLite path made absolute, else the runtime folder's."""
        if self.database_url is None:
            return f"sqlite:///{self.resolved_runtime_dir() / DATABASE_FILE}"
        url = self.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith("sqlite:////"):
            rel = url[len(prefix) :]
            if rel and rel != ":memory:" and not rel.startswith(":"):
                url = prefix + str(PROJECT_ROOT / rel)
        return url

    def secret(self) -> str:
        """The signing secret: configured, or generated once into the runtime folder in development.

        Never random per restart: a new secret would sign everyone out and break stored signatures. A secret
        shorter than `MIN_SECRET_BYTES` is refused, wherever it comes from: HS256 cookies signed with a short key
        can be brute-forced offline from one cookie.
        """
        if self.secret_key is not None:
            return _checked_secret(self.secret_key.get_secret_value(), "CALLBOT_SECRET_KEY")
        if self.env == "production":
            raise ConfigError("CALLBOT_SECRET_KEY must be set when CALLBOT_ENV=production")
        return _read_or_create_secret(self.resolved_runtime_dir() / SECRET_KEY_FILE)


MIN_SECRET_BYTES = 32
_MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(48))'"


def _checked_secret(value: str, where: str) -> str:
    value = value.strip()
    size = len(value.encode("utf-8"))
    if size < MIN_SECRET_BYTES:
        what = "is empty" if not size else f"is {size} bytes"
        raise ConfigError(f"{where} {what}; a secret needs at least {MIN_SECRET_BYTES} bytes (make one: {_MAKE_ONE})")
    return value


def _read_or_create_secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL so two processes starting at once cannot each write a different secret.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # the other process won: read what it wrote below
        else:
            value = secrets.token_urlsafe(48)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(value + "\n")
            return value
    # An empty or short file is refused, not replaced: replacing it would sign everyone out without a word, and a
    # file someone truncated is worth a look. (The winner of a creation race writes within microseconds.)
    return _checked_secret(_read_when_written(path), f"The secret file {path}")


def _read_when_written(path: Path) -> str:
    for _ in range(20):
        value = path.read_text(encoding="utf-8")
        if value.strip():
            return value
        time.sleep(0.01)
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
