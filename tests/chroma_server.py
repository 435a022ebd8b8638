"""A real Chroma server for tests: `chroma run` (from the chromadb package) on a free loopback port, its data in a
temporary folder.

`chroma_url` is a session fixture for it. Import it into a folder's conftest.py (`from tests.chroma_server import
chroma_url`); every folder that does so shares the one server of the process (an xdist worker starts its own), so
tests keep apart by their collection names. Outside CI a server that cannot start skips the tests that need it; in CI
(CI=true) it fails them, with the server's output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMA = Path(sys.executable).with_name("chroma")
IN_CI = os.environ.get("CI", "").lower() == "true"
START_TIMEOUT_S = 60.0
_OUTPUT_TAIL = 4000


class ChromaServerError(RuntimeError):
    """The server did not come up; the message carries its output."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ChromaServer:
    """`chroma run --path DATA --host 127.0.0.1 --port PORT`, started and stopped by us."""

    def __init__(self, data_dir: Path, *, port: int | None = None, executable: Path = CHROMA) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.executable = executable
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        if not text.strip():
            return "(no output)"
        return text if len(text) <= _OUTPUT_TAIL else "…" + text[-_OUTPUT_TAIL:]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> ChromaServer:
        if not self.executable.exists():
            raise ChromaServerError(f"{self.executable} does not exist: is chromadb installed in this venv?")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
        # Output to a file, not a pipe: nobody reads a pipe while the tests run, and a full one would block the server.
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    str(self.executable),
                    "run",
                    "--path",
                    str(self.data_dir),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                raise ChromaServerError(f"`chroma run` exited with code {code} before answering:\n{self.output()}")
            try:
                if httpx.get(self.url + "/api/v2/heartbeat", timeout=1.0, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ChromaServerError(
                    f"`chroma run` did not answer on {self.url} within {timeout_s:.0f} s:\n{self.output()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


_shared: ChromaServer | None = None
_shared_error: str | None = None
_shared_lock = threading.Lock()


def shared_server(tmp_path_factory: pytest.TempPathFactory) -> ChromaServer:
    """The process's one test server, started on first use (a failure is remembered, not retried per folder)."""
    global _shared, _shared_error
    with _shared_lock:
        if _shared is None and _shared_error is None:
            server = ChromaServer(tmp_path_factory.mktemp("chroma-server") / "data")
            try:
                _shared = server.start()
            except ChromaServerError as exc:
                _shared_error = str(exc)
        if _shared is None:
            raise ChromaServerError(_shared_error or "the Chroma test server did not start")
        return _shared


def stop_shared_server() -> None:
    global _shared
    with _shared_lock:
        server, _shared = _shared, None
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real Chroma server (`chroma run`) for this test process."""
    try:
        server: ChromaServer | None = shared_server(tmp_path_factory)
        problem = ""
    except ChromaServerError as exc:
        server, problem = None, str(exc)
    if server is None:  # outside the except block: the report is the server's output, not a chained traceback
        if IN_CI:
            pytest.fail(f"The Chroma test server is required in CI: {problem}", pytrace=False)
        pytest.skip(f"The Chroma test server did not start: {problem}")
    yield server.url
    # Every folder that imported this fixture finalises it at the end of the session; the first stop is the real one.
    stop_shared_server()
