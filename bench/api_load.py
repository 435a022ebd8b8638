"""The HTTP API under load: many concurrent streaming calls, every message stored exactly once.

Starts `callbot api`'s own server (uvicorn, JSON logs to a file) in a child process on a fresh SQLite store (or
PostgreSQL with `--database-url`), with a backend that yields a fixed reply at once (registered through the real
registry in that process), so what is measured is the API and the engine, not a model. Then `--clients` concurrent
callers (asyncio + httpx, one API key) each hold calls of `--turns` turns (a conversation per call) and send
streaming turns (server-sent events), pausing `--think-s` on average between turns as a caller speaks, until
`--seconds` have passed. Each message carries a unique id; at the end the store must hold every answered message
exactly once with a stored reply.

- `lost_messages`: messages sent and answered with a final `turn` event but not stored exactly once (target 0);
- `failed_turns`: turns that ended with an `error` event or an HTTP error (reported, not hidden);
- `turns_per_s`: completed turns per second over the run;
- `p95_overhead_ms`: per turn, the client's time from sending the request to the final event minus the engine's own
  `total_ms` for that turn (stored in turn_metrics and sent in the final event); p95 over all turns (target <= 50 on
  SQLite). The baseline, the engine's own time, is measured in the same run for the same turn;
- `engine_p95_ms`: the engine's own turn time, p95, for scale;
- `peak_rss_mb`: the server process's peak resident memory (VmHWM), the figure that must stay laptop-sized.

    .venv/bin/python bench/api_load.py [--clients 50] [--seconds 60] [--turns 10] [--think-s 2] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import emit, percentile  # noqa: E402

REPLY = ("Thank", " you", " for", " calling", ",", " we", " are", " open", " until", " six", ".")


class FixedReply:
    """A backend that yields the same short reply at once: the load is on the API and the engine."""

    name = "fixed"
    where = "this process"
    default_model = "fixed-1"

    def stream(self, messages, params, *, model=None) -> Iterator:  # type: ignore[no-untyped-def]
        from callbot_core.backends.llm import Token, Usage

        for piece in REPLY:
            yield Token(piece)
        yield Token("", usage=Usage(prompt_tokens=sum(len(m.content.split()) for m in messages), completion_tokens=11))

    def list_models(self) -> list[str]:
        return [self.default_model]

    def health(self):  # type: ignore[no-untyped-def]
        from callbot_core.backends.llm import Health

        return Health(True, self.name, self.where)

    def context_window(self, model: str | None = None) -> int:
        return 4096

    def count_tokens(self, text: str, model: str | None = None) -> int:
        return len(text.split())


def serve(port: int, database_url: str, runtime_dir: str) -> None:
    """The child process: `callbot api`'s server (JSON logs included) over the store, the fixed backend by default."""
    from callbot_core.api.server import serve as serve_api
    from callbot_core.backends.llm import llm_backends
    from callbot_core.settings import Settings

    fixed = FixedReply()
    llm_backends.register("fixed", lambda settings: fixed)
    # The chat rate limits are off: 50 clients on one key are the load being measured, not abuse.
    settings = Settings(_env_file=None, database_url=database_url, runtime_dir=Path(runtime_dir),  # type: ignore[call-arg]
                        llm_backend="fixed", bcrypt_rounds=4, rate_limit_chat_per_client=0,
                        rate_limit_chat_per_key=0)  # fmt: skip
    serve_api(settings, host="127.0.0.1", port=port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _client(base: str, key: str, deadline: float, turns: int, think_s: float, out: dict[str, list]) -> None:  # type: ignore[type-arg]
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:
        cid, done = None, 0
        while time.monotonic() < deadline:
            if cid is None or done == turns:
                r = await client.post("/v1/conversations", json={"persona": "receptionist"})
                if r.status_code != 201:
                    out["errors"].append(f"start {r.status_code}: {r.text[:200]}")
                    return
                cid, done = r.json()["id"], 0
            elif think_s:
                # The caller speaks between replies: a call is not a stream of back-to-back requests.
                await asyncio.sleep(think_s * random.uniform(0.5, 1.5))
            done += 1
            text = f"Are you open today? [{uuid.uuid4().hex}]"
            out["sent"].append(text)
            started = time.perf_counter()
            event, final = None, None
            try:
                async with client.stream("POST", f"/v1/conversations/{cid}/turns?stream=true",
                                         json={"text": text}) as response:  # fmt: skip
                    if response.status_code != 200:
                        out["errors"].append(f"turn {response.status_code}")
                        continue
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event in ("turn", "error"):
                            final = (event, json.loads(line[6:]))
            except httpx.HTTPError as exc:
                out["errors"].append(f"turn transport: {exc!r}"[:200])
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            if final is None or final[0] != "turn" or final[1].get("error"):
                out["errors"].append(f"turn ended with {final!r}"[:200])
                continue
            out["answered"].append(text)
            out["overhead"].append(elapsed_ms - float(final[1]["total_ms"]))
            out["engine"].append(float(final[1]["total_ms"]))


def _stored_counts(database_url: str) -> dict[str, int]:
    """How many times each caller text is stored with a stored reply (a turn_metrics row without an error)."""
    from sqlalchemy import func, select

    from callbot_core.store import Store
    from callbot_core.store.models import Message, TurnMetrics

    store = Store(database_url)
    try:
        with store.session() as session:
            rows = session.execute(
                select(Message.text, func.count())
                .join(TurnMetrics, TurnMetrics.user_message_id == Message.id)
                .where(TurnMetrics.error.is_(None), TurnMetrics.assistant_message_id.is_not(None))
                .group_by(Message.text)
            )
            return {text: int(n) for text, n in rows}
    finally:
        store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--turns", type=int, default=10, help="turns per conversation (a call), then a new one")
    parser.add_argument("--think-s", type=float, default=2.0, help="mean time the caller speaks between turns")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "URL", "RUNTIME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return

    from callbot_core.access import apikeys
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.access.signin import create_user
    from callbot_core.store import Store
    from callbot_core.store.seeds import seed_default_personas

    tmp = Path(tempfile.mkdtemp(prefix="callbot-api-load-"))
    url = args.database_url or f"sqlite:///{tmp / 'load.db'}"
    os.environ["CALLBOT_BCRYPT_ROUNDS"] = "4"
    store = Store(url)
    store.upgrade()
    seed_default_personas(store)
    create_user(store, "loadtest", "load-test-password", role="researcher", actor=LOCAL_OPERATOR)
    key = apikeys.create_key(store, "loadtest", "bench", actor=LOCAL_OPERATOR).key
    store.dispose()

    port = _free_port()
    # The server's JSON log goes to a file: one line per request and per turn, as `callbot api` writes them.
    server_log = (tmp / "api.log").open("w")
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), url, str(tmp / "runtime")],
                              stdout=server_log, stderr=server_log)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the API server did not start")
            time.sleep(0.2)  # polling the server until it answers

        out: dict[str, list] = {"sent": [], "answered": [], "overhead": [], "engine": [], "errors": []}  # type: ignore[type-arg]
        started = time.monotonic()
        end = started + args.seconds

        async def _run() -> None:
            await asyncio.gather(*(_client(base, key, end, args.turns, args.think_s, out) for _ in range(args.clients)))

        asyncio.run(_run())
        wall = time.monotonic() - started
        rss = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    stored = _stored_counts(url)
    lost = sum(1 for text in out["answered"] if stored.get(text, 0) != 1)
    duplicated = sum(1 for text in out["sent"] if stored.get(text, 0) > 1)
    print(f"clients={args.clients} seconds={args.seconds:g} sent={len(out['sent'])} answered={len(out['answered'])} "
          f"errors={len(out['errors'])} duplicated={duplicated}")  # fmt: skip
    for line in out["errors"][:5]:
        print("  error:", line)
    emit(
        lost_messages=lost + duplicated,
        failed_turns=len(out["errors"]),
        turns_per_s=len(out["answered"]) / wall,
        p95_overhead_ms=percentile(out["overhead"], 0.95),
        p50_overhead_ms=percentile(out["overhead"], 0.5),
        engine_p95_ms=percentile(out["engine"], 0.95),
        peak_rss_mb=rss,
    )


if __name__ == "__main__":
    main()
