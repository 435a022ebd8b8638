"""Issue 12's "done when", as a new user does it, with the installed commands and the real embedded model:
`callbot apikey create`, `callbot api`, the `openai` SDK streaming a reply from `receptionist` with that key, then
the call found by `callbot sql` (channel 'api') and `callbot conversations`; an anonymous request gets 401."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.api.conftest import free_port

CALLBOT = str(Path(sys.executable).with_name("callbot"))

pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_a_new_user_streams_a_persona_through_the_openai_sdk_and_finds_the_call(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(
        CALLBOT_DATABASE_URL=f"sqlite:///{tmp_path / 'callbot.db'}",
        CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"),
        CALLBOT_BCRYPT_ROUNDS="4",
    )

    def callbot(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([CALLBOT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    callbot("db", "upgrade")
    subprocess.run([CALLBOT, "user", "add", "ann", "--role", "researcher", "--password-stdin"], input="long-enough-1\n",
                   env=env, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    key = callbot("apikey", "create", "--user", "ann", "--name", "notebook").stdout.strip()
    assert key.startswith("cbk_")

    port = free_port()
    log = (tmp_path / "api.log").open("w")
    server = subprocess.Popen([CALLBOT, "api", "--port", str(port)], env=env, cwd=tmp_path, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()
            time.sleep(0.2)  # polling the starting server

        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/conversations").status_code == 401

        client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        pieces, usage = [], None
        for chunk in client.chat.completions.create(
            model="receptionist",
            messages=[{"role": "user", "content": "When are you open?"}],
            stream=True,
            max_tokens=8,
            stream_options={"include_usage": True},
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        reply = "".join(pieces)
        assert reply.strip() and usage is not None and 0 < usage.completion_tokens <= 8
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = callbot("sql", "--format", "csv",
                   "select username, persona, completion_tokens from turns where channel = 'api'").stdout  # fmt: skip
    lines = [line for line in rows.strip().splitlines() if line]
    assert lines[0].split(",")[:2] == ["username", "persona"]
    assert len(lines) == 2 and lines[1].startswith("ann,receptionist,")
    listed = callbot("conversations", "list").stdout
    row = next(line for line in listed.splitlines() if "receptionist@" in line)
    assert " ann " in row and " active " in row
