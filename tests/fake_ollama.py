"""A small Ollama look-alike for tests: its real wire format, over a real socket on 127.0.0.1.

`/api/chat` streams NDJSON over chunked transfer encoding exactly as Ollama does; `/api/tags` lists
models. Modes: "normal", "stall" (a few chunks, then silence longer than a client's read timeout),
"error500" (HTTP 500 with {"error": ...}) and "error_midstream" (a few chunks, then an error line).
`drop_first=n` closes the first n connections without answering, as a restarting server would.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Mode = Literal["normal", "stall", "error500", "error_midstream"]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


@dataclass
class FakeOllama:
    reply: Sequence[str] = ("Hello", " there", "!")
    mode: Mode = "normal"
    models: Sequence[str] = ("smollm2:135m", "qwen2.5:0.5b")
    # stall / error_midstream: how many content chunks go out first.
    chunks_before_trouble: int = 2
    stall_s: float = 5.0
    error_message: str = "model runner has unexpectedly stopped"
    drop_first: int = 0
    done_reason: str = "stop"
    # A slow model: a wait before the first piece (prompt evaluation) and between pieces (decoding).
    first_delay_s: float = 0.0
    piece_delay_s: float = 0.0
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set on stop so a stalled handler ends at once instead of sleeping out its stall.
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/api/chat"]

    def start(self) -> FakeOllama:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        # A short poll so stop() (which waits for the serving loop to notice) is quick.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_drop(self) -> bool:
        with self._lock:
            if self.drop_first > 0:
                self.drop_first -= 1
                return True
            return False


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that closed a kept-alive or abandoned connection is normal in these tests, not news.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def down_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOllama
    # HTTP/1.1 so the stream can use chunked transfer encoding, as Ollama's Go server does.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> RecordedRequest:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        request = RecordedRequest(self.command, self.path, dict(self.headers.items()), body)
        self.fake.requests.append(request)
        return request

    def _drop(self) -> bool:
        if self.fake._take_drop():
            # Close without a byte of answer: the client sees "server disconnected".
            self.close_connection = True
            return True
        return False

    def _send_json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self._record()
        if self._drop():
            return
        if self.path == "/api/tags":
            self._send_json(200, {"models": [_tag(name) for name in self.fake.models]})
        elif self.path == "/api/version":
            self._send_json(200, {"version": "0.6.5"})
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        request = self._record()
        if self._drop():
            return
        if self.path != "/api/chat":
            self._send_json(404, {"error": "not found"})
            return
        fake = self.fake
        if fake.mode == "error500":
            self._send_json(500, {"error": fake.error_message})
            return
        model = (request.body or {}).get("model", "")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._stream(fake, model)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (read timeout): nothing more to say to it.
            self.close_connection = True

    def _stream(self, fake: FakeOllama, model: str) -> None:
        for i, piece in enumerate(fake.reply):
            if fake.mode in ("stall", "error_midstream") and i == fake.chunks_before_trouble:
                if fake.mode == "stall":
                    fake._stopping.wait(fake.stall_s)
                    self.close_connection = True
                    return
                self._chunk({"error": fake.error_message})
                self._end()
                return
            delay = fake.first_delay_s if i == 0 else fake.piece_delay_s
            if delay:
                fake._stopping.wait(delay)
            self._chunk(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": piece},
                    "done": False,
                }
            )
        self._chunk(
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": fake.done_reason,
                "done": True,
                "total_duration": 912_345_678,
                "load_duration": 12_345_678,
                "prompt_eval_count": 26,
                "prompt_eval_duration": 130_000_000,
                "eval_count": len(fake.reply),
                "eval_duration": 650_000_000,
            }
        )
        self._end()

    def _chunk(self, data: dict[str, Any]) -> None:
        line = json.dumps(data).encode() + b"\n"
        self.wfile.write(f"{len(line):X}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 91_739_413,
        "digest": "0" * 64,
        "details": {
            "format": "gguf",
            "family": "llama",
            "parameter_size": "135M",
            "quantization_level": "Q4_1",
        },
    }
