"""The `callbot` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

from callbot_core.store import Store
from callbot_core.store.models import Conversation


@pytest.mark.model
def test_the_done_when_path(run, tmp_path: Path) -> None:
    assert "up to date" in run("db", "upgrade").stdout
    secret = (tmp_path / "runtime" / "secret_key").read_text()
    run("db", "upgrade")
    assert (tmp_path / "runtime" / "secret_key").read_text() == secret  # generated once, kept across runs
    out = run("chat", "--persona", "receptionist", "--message", "What are your opening hours?",
              "--var", "caller_name=Ann Lee").stdout  # fmt: skip
    assert "receptionist@1" in out and "bot> " in out
    with Store(f"sqlite:///{tmp_path / 'cli.db'}").session() as s:
        assert s.scalar(select(Conversation.variables))["caller_name"] == "Ann Lee"
    reply = out.split("bot> ", 1)[1].split("[TTFT", 1)[0].strip()
    assert len(reply) > 5
    assert re.search(r"\[TTFT \d[\d,]* ms · \d+ tok/s · \d+ tokens", out)

    listing = run("conversations", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith("1 "))
    assert "receptionist@1" in row and re.search(r"\b1\s+0\s+\d[\d,]* ms", row)

    shown = run("conversations", "show", "1").stdout
    assert "What are your opening hours?" in shown and reply[:20] in shown

    out_jsonl = tmp_path / "c.jsonl"
    assert (
        "Exported 1 conversation" in run("export", "conversations", "--format", "jsonl", "--out", str(out_jsonl)).stdout
    )
    doc = json.loads(out_jsonl.read_text().splitlines()[0])
    assert doc["persona"] == "receptionist" and doc["turns"] == 1
    assert [m["role"] for m in doc["messages"]] == ["assistant", "user", "assistant"]
    assert doc["messages"][2]["ttft_ms"] > 0

    out_csv = tmp_path / "c.csv"
    run("export", "conversations", "--format", "csv", "--out", str(out_csv))
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 3 and rows[1]["text"] == "What are your opening hours?"


@pytest.mark.model
def test_repl_streams_turns_and_end_prints_summaries(run) -> None:
    run("db", "upgrade")
    out = run("chat", "--persona", "support", input="Where is my parcel?\n/end\n").stdout
    assert "thanks for calling customer support" in out
    assert out.count("bot> ") >= 2
    assert "Summary (short):" in out and "Summary (full):" in out
    listing = run("conversations", "list").stdout
    assert "ended" in listing


@pytest.mark.model
def test_repl_refuses_an_empty_line_and_goes_on(run) -> None:
    run("db", "upgrade")
    proc = run("chat", input=" \nhello\n/quit\n")
    assert "Not sent: The message is empty" in proc.stderr
    assert proc.stdout.count("bot> ") >= 2


def test_user_add_reads_the_password_from_stdin(run) -> None:
    run("db", "upgrade")
    assert (
        "added with role admin"
        in run("user", "add", "ada", "--role", "admin", "--password-stdin", input="s3cret-pass\n").stdout
    )
    dup = run("user", "add", "ada", "--password-stdin", input="s3cret-pass\n", ok=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    short = run("user", "add", "bob", "--password-stdin", input="123\n", ok=False)
    assert short.returncode == 1 and "too short" in short.stderr


def test_errors_are_one_clear_line(run) -> None:
    before = run("chat", "--message", "hi", ok=False)
    assert before.returncode == 1 and "run `callbot db upgrade` first" in before.stderr
    run("db", "upgrade")
    unknown = run("chat", "--persona", "pirate", "--message", "hi", ok=False)
    assert unknown.returncode == 1 and "Unknown persona 'pirate'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    empty = run("chat", "--message", "   ", ok=False)
    assert empty.returncode == 1 and "The message is empty" in empty.stderr
    missing = run("conversations", "show", "42", ok=False)
    assert missing.returncode == 1 and "Unknown conversation id 42" in missing.stderr
    down = run("chat", "--backend", "ollama", "--model", "x", "--message", "hi", ok=False)
    assert down.returncode == 1 and "is not reachable" in down.stderr
    listed = run("conversations", "list").stdout
    for var, message in [("caller_name", "is not NAME=VALUE"), ("caller name=Ann", "'caller name' is not valid")]:
        bad = run("chat", "--message", "hi", "--var", var, ok=False)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert run("conversations", "list").stdout == listed  # refused before anything was stored


def test_production_without_a_secret_refuses_to_start(run, tmp_path: Path) -> None:
    proc = run("db", "upgrade", env_extra={"CALLBOT_ENV": "production"}, ok=False)
    assert proc.returncode == 1 and "CALLBOT_SECRET_KEY must be set" in proc.stderr
    assert not (tmp_path / "runtime" / "secret_key").exists()


@pytest.mark.model
def test_personas_and_models(run) -> None:
    run("db", "upgrade")
    personas = run("personas").stdout
    for key in ("receptionist", "support", "sales", "tutor", "assistant"):
        assert key in personas
    models = run("models").stdout
    assert "embedded" in models and "ok" in models and "SmolLM2-135M-Instruct.Q4_1" in models


def test_a_refused_message_opens_no_conversation(run, tmp_path: Path) -> None:
    run("db", "upgrade")
    refused = run("chat", "--persona", "receptionist", "--message", "   ", ok=False)
    assert refused.returncode == 1 and "The message is empty" in refused.stderr
    with Store(run.url).session() as s:
        assert s.scalar(select(func.count()).select_from(Conversation)) == 0
