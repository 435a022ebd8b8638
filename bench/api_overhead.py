"""What the OpenAI-compatible endpoint adds to time-to-first-token, on the embedded model.

One process holds one conversation service on the embedded model; the real API (`create_app` under uvicorn) serves
that same service on a loopback port. Each round asks the same question twice, alternating the order so machine
noise and the model's prompt cache hit both alike:
- in-process: `service.start("receptionist")` + `service.send(...)`, timed from the call to start until the first
  piece of the reply (a new conversation, as the API call makes);
- over HTTP: `POST /v1/chat/completions` with `stream: true` and an API key, timed from sending the request until
  the first chunk that carries reply text arrives (authentication, the new conversation, the SSE framing and the
  socket included).
Both use the persona's prompt with the same seed and `max_tokens`, so the model does the same work.

`ttft_overhead_ms` = median(HTTP TTFT) - median(in-process TTFT) (target <= 10); both medians are printed.

    .venv/bin/python bench/api_overhead.py [--rounds 10] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import emit, median, peak_rss_mb  # noqa: E402

QUESTION = "What are your opening hours on Saturday?"
SEED = 1234


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    os.environ["CALLBOT_BCRYPT_ROUNDS"] = "4"
    import httpx
    import uvicorn

    from callbot_core.access import apikeys
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.access.signin import create_user
    from callbot_core.api import create_app
    from callbot_core.backends.llm import GenerationParams
    from callbot_core.conversations.service import ConversationService
    from callbot_core.settings import Settings
    from callbot_core.store import Store
    from callbot_core.store.seeds import seed_default_personas

    tmp = Path(tempfile.mkdtemp(prefix="callbot-api-overhead-"))
    # Rate limits off: this measures the path, not the limiter's refusals.
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp / 'bench.db'}", runtime_dir=tmp,  # type: ignore[call-arg]
                        llm_backend="embedded", rate_limit_chat_per_client=0, rate_limit_chat_per_key=0)  # fmt: skip
    store = Store(settings.resolved_database_url())
    store.upgrade()
    seed_default_personas(store)
    create_user(store, "bench", "bench-password-1", role="researcher", actor=LOCAL_OPERATOR)
    key = apikeys.create_key(store, "bench", "overhead", actor=LOCAL_OPERATOR).key
    service = ConversationService(store, settings)
    params = GenerationParams(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, seed=SEED)

    server = uvicorn.Server(uvicorn.Config(create_app(settings, store=store, service=service), host="127.0.0.1",
                                           port=0, log_level="warning", access_log=False))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)  # polling uvicorn's own started flag
    port = server.servers[0].sockets[0].getsockname()[1]
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=120)
    body = {
        "model": "receptionist",
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": args.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": SEED,
    }

    def in_process() -> float:
        started = time.perf_counter()
        info = service.start("receptionist", actor=LOCAL_OPERATOR)
        with service.send(info.id, QUESTION, actor=LOCAL_OPERATOR, params=params) as turn:
            first = None
            for piece in turn:
                if piece and first is None:
                    first = (time.perf_counter() - started) * 1000
        assert first is not None, "no reply text in process"
        return first

    def over_http() -> float:
        started = time.perf_counter()
        first = None
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = (time.perf_counter() - started) * 1000
        assert first is not None, "no reply text over HTTP"
        return first

    in_process()  # warm both paths once: the model's first call and the first connection are not what is measured
    over_http()
    local, remote = [], []
    for round_ in range(args.rounds):
        order = (in_process, over_http) if round_ % 2 == 0 else (over_http, in_process)
        for path in order:
            (local if path is in_process else remote).append(path())
    client.close()
    server.should_exit = True
    thread.join(timeout=10)

    emit(
        ttft_overhead_ms=median(remote) - median(local),
        http_ttft_ms=median(remote),
        in_process_ttft_ms=median(local),
        rounds=args.rounds,
        peak_rss_mb=peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
