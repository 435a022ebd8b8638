"""`callbot knowledge` as a new user runs it, on the shipped sample documents, the real embedding model and the real
embedded LLM: a folder of mixed documents with a bad file among them, search as JSON, the evaluation, a persona that
answers with citations, list and delete.

The first command runs the installed `callbot` in a subprocess; the rest run `callbot_core.cli.main` in this process,
with the same environment, so the embedding model and the LLM load once rather than once per command (each process
would pay ~5 s for torch and the model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from callbot_core.backends.vectors.chroma import close_persistent_clients
from callbot_core.cli import main
from callbot_core.settings import get_settings

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "knowledge"


@pytest.fixture
def callbot(
    run: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:  # fmt: skip
    """`callbot ARGS…` in this process, on the `run` fixture's store; returns what a subprocess run would."""
    for name in [n for n in os.environ if n.startswith("CALLBOT_") and n != "CALLBOT_BCRYPT_ROUNDS"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CALLBOT_DATABASE_URL", run.url)  # type: ignore[attr-defined]
    monkeypatch.setenv("CALLBOT_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()

    def _call(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        if ok:
            assert code == 0, err
        return subprocess.CompletedProcess(list(args), code, out, err)

    yield _call
    get_settings.cache_clear()
    close_persistent_clients()


@pytest.mark.model
def test_the_done_when_path(run, callbot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run("db", "upgrade")
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLES / "clinic", docs)
    (docs / "scan.pdf").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 200)  # a JPEG named .pdf
    (docs / "empty.txt").write_bytes(b"")

    ingest = run("knowledge", "ingest", str(docs), "--collection", "clinic", ok=False)
    assert ingest.returncode == 1  # some files were refused
    refused = [line for line in ingest.stderr.splitlines() if line.startswith("refused")]
    assert refused == [
        "refused    empty.txt: empty file",
        "refused    scan.pdf: not a PDF (the bytes are a JPEG image)",
    ]
    assert "Traceback" not in ingest.stderr
    assert "6 ingested, 0 replaced, 0 unchanged, 2 refused" in ingest.stdout

    found = json.loads(callbot("knowledge", "search", "How much is the fee if I miss my appointment?",
                           "--collection", "clinic", "--k", "3", "--format", "json").stdout)  # fmt: skip
    best = found["hits"][0]
    assert (best["source"], best["page"], best["rank"]) == ("fees.pdf", 3, 1)
    assert 0 < best["similarity"] <= 1 and found["low_relevance"] is False
    assert set(best) == {"source", "page", "heading", "chunk_id", "similarity", "rank", "text"}

    scored = json.loads(callbot("knowledge", "eval", str(SAMPLES / "clinic-questions.jsonl"), "--collection", "clinic",
                            "--format", "json").stdout)  # fmt: skip
    assert scored["questions"] == 20 and scored["answerable"] == 16
    assert scored["recall_at_5"] >= 0.9 and scored["mrr"] >= 0.8
    assert scored["unanswerable_flagged"] >= 3
    rows = callbot("sql", "select collection, k, recall_at_k from retrieval_evals").stdout
    assert "clinic" in rows

    callbot("persona", "edit", "receptionist", "--knowledge", "clinic", "--knowledge-k", "2", "--max-tokens", "16")
    chat = callbot("chat", "--persona", "receptionist", "--message", "Are you open on Saturday?")
    assert "[retrieval " in chat.stdout and "[1] opening-hours.md" in chat.stdout
    stages = callbot("sql", "select stage, ms from turn_stages order by position").stdout
    assert "retrieve" in stages
    used = callbot("sql", "select source, rank, similarity from retrievals").stdout
    assert "opening-hours.md" in used

    listed = json.loads(callbot("knowledge", "list", "--collection", "clinic", "--format", "json").stdout)
    assert {d["source"]: d["pages"] for d in listed}["fees.pdf"] == 3
    assert "Deleted faq.txt" in callbot("knowledge", "delete", "--collection", "clinic", "faq.txt").stdout
    bad_name = callbot("knowledge", "ingest", "/nonexistent", "--collection", "Bad Name", ok=False)
    assert bad_name.returncode == 1 and "collection name" in bad_name.stderr and "refused" not in bad_name.stderr
    gone = callbot("knowledge", "delete", "--collection", "clinic", "faq.txt", ok=False)
    assert gone.returncode == 1 and gone.stderr.strip() == "Error: Collection 'clinic' has no document 'faq.txt'"
