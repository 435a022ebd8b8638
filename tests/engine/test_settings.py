"""Settings: environment variables, a .env file, and a secret that survives restarts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from callbot_core.errors import ConfigError
from callbot_core.settings import PROJECT_ROOT, Settings


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CALLBOT_"):
            monkeypatch.delenv(key)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.database_url is None  # the default store lives in the runtime folder
    assert s.llm_backend == "embedded"
    assert s.max_message_chars == 8000
    # A relative runtime folder is anchored at the project, not at whatever directory the CLI runs in.
    assert s.resolved_database_url() == f"sqlite:///{PROJECT_ROOT / 'data/runtime/callbot.db'}"


def test_environment_and_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CALLBOT_LLM_BACKEND=ollama\nCALLBOT_MAX_MESSAGE_CHARS=500\n", encoding="utf-8")
    monkeypatch.setenv("CALLBOT_MAX_MESSAGE_CHARS", "600")  # the environment wins over the file
    s = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert s.llm_backend == "ollama"
    assert s.max_message_chars == 600


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBOT_MAX_MESSAGE_CHARS", "lots")
    with pytest.raises(ValueError, match="max_message_chars"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    s = Settings(_env_file=None, runtime_dir=tmp_path / "rt")  # type: ignore[call-arg]
    first = s.secret()
    again = Settings(_env_file=None, runtime_dir=tmp_path / "rt").secret()  # type: ignore[call-arg]
    assert first == again and len(first) >= 40
    mode = stat.S_IMODE((tmp_path / "rt" / "secret_key").stat().st_mode)
    assert mode == 0o600


def test_configured_secret_wins(tmp_path: Path) -> None:
    configured = "from-env-" + "k" * 40
    s = Settings(_env_file=None, runtime_dir=tmp_path, secret_key=configured)  # type: ignore[call-arg]
    assert s.secret() == configured
    assert not (tmp_path / "secret_key").exists()


@pytest.mark.parametrize(("value", "problem"), [("", "is empty"), ("   ", "is empty"), ("short-secret", "is 12 bytes")])
def test_an_empty_or_short_configured_secret_is_refused(tmp_path: Path, value: str, problem: str) -> None:
    s = Settings(_env_file=None, runtime_dir=tmp_path, secret_key=value)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=f"CALLBOT_SECRET_KEY {problem}; a secret needs at least 32 bytes"):
        s.secret()
    # Refused, not replaced by a generated one behind the operator's back.
    assert not (tmp_path / "secret_key").exists()


@pytest.mark.parametrize(("content", "problem"), [("", "is empty"), ("\n", "is empty"), ("abc\n", "is 3 bytes")])
def test_an_empty_or_short_secret_file_is_refused_and_kept(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / "secret_key").write_text(content)
    s = Settings(_env_file=None, runtime_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=f"The secret file .*secret_key {problem}"):
        s.secret()
    assert (tmp_path / "secret_key").read_text() == content


def test_production_requires_a_secret(tmp_path: Path) -> None:
    s = Settings(_env_file=None, env="production", runtime_dir=tmp_path)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="CALLBOT_SECRET_KEY must be set"):
        s.secret()
    assert not (tmp_path / "secret_key").exists()


def test_the_default_store_follows_the_runtime_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("CALLBOT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CALLBOT_RUNTIME_DIR", str(tmp_path / "rt"))
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'rt' / 'callbot.db'}"
    monkeypatch.setenv("CALLBOT_DATABASE_URL", "sqlite:///elsewhere.db")
    assert Settings(_env_file=None).resolved_database_url() == f"sqlite:///{PROJECT_ROOT / 'elsewhere.db'}"  # type: ignore[call-arg]


def test_the_readme_documents_every_setting() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Configuration") :]
    missing = [f"CALLBOT_{name.upper()}" for name in Settings.model_fields if f"`CALLBOT_{name.upper()}`" not in table]
    assert not missing, f"README's configuration table lacks {missing}"


def test_the_engine_reads_no_callbot_variable_behind_the_settings() -> None:
    # Every CALLBOT_* variable goes through Settings, so the table above is complete.
    offenders = []
    for path in (PROJECT_ROOT / "callbot_core").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if ("os.environ" in text or "getenv" in text) and '"CALLBOT_' in text and path.name != "settings.py":
            offenders += [f"{path.name}:{n}" for n, line in enumerate(text.splitlines(), 1)
                          if '"CALLBOT_' in line and ("environ" in line or "getenv" in line)]  # fmt: skip
    assert not offenders, offenders
