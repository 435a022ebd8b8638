"""How much the conversation service costs on top of raw llama-cpp-python.

Streams the same prompt with the same seed through raw `Llama.create_chat_completion` and through
`ConversationService.send`, alternating so machine noise hits both alike, and prints decode tokens/s
for both, their ratio (`decode_ratio`, target >= 0.95) and the TTFT difference (`ttft_overhead_ms`,
target <= 15). The service's TTFT is timed from the call to `send` (validation, store reads, prompt
building included) to its first token.

A seeded request evaluates its whole prompt afresh (see `EmbeddedBackend.stream`: the prompt cache would
make the same seed give different replies), so the raw path resets the model before each call too: both
paths do the same model work. A third path, raw without the reset, shows what the prompt cache saves
(`seed_reset_ttft_ms`): the price of reproducibility on this prompt.

    .venv/bin/python bench/llm_overhead.py [--rounds 10] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import emit, median, peak_rss_mb  # noqa: E402
from callbot_core.access.permissions import LOCAL_OPERATOR  # noqa: E402
from callbot_core.backends.llm import GenerationParams, get_backend  # noqa: E402
from callbot_core.backends.llm.embedded import EmbeddedBackend  # noqa: E402
from callbot_core.conversations.service import ConversationService  # noqa: E402
from callbot_core.settings import Settings  # noqa: E402
from callbot_core.store import Store  # noqa: E402

QUESTION = "What are your opening hours on Saturday?"


def _decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="callbot-bench-"))
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp / 'bench.db'}", runtime_dir=tmp)  # type: ignore[call-arg]
    store = Store(settings.resolved_database_url())
    store.upgrade()
    backend = get_backend("embedded", settings)
    assert isinstance(backend, EmbeddedBackend)
    llm = backend._llm()
    service = ConversationService(store, settings, backends=lambda name: backend)
    params = GenerationParams(temperature=0.7, top_p=0.95, max_tokens=args.max_tokens, seed=1234)

    # The exact messages the service sends, so both paths evaluate the same prompt.
    probe = service.start("receptionist", actor=LOCAL_OPERATOR)
    messages = [
        {"role": m.role, "content": m.content}
        for m in service.send(probe.id, QUESTION, params=params, actor=LOCAL_OPERATOR).turn.messages
    ]

    def raw(*, reset: bool = True) -> tuple[float, list[float]]:
        if reset:
            llm.reset()  # as the service does for a seeded request
        t0 = time.perf_counter()
        stamps: list[float] = []
        for chunk in llm.create_chat_completion(
            messages=messages, stream=True, temperature=params.temperature, top_p=params.top_p,
            max_tokens=params.max_tokens, seed=params.seed,
        ):  # fmt: skip
            if chunk["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
        return (stamps[0] - t0) * 1000, stamps

    def through_service() -> tuple[float, list[float]]:
        conversation = service.start("receptionist", actor=LOCAL_OPERATOR)
        t0 = time.perf_counter()
        stamps = []
        for _ in service.send(conversation.id, QUESTION, params=params, actor=LOCAL_OPERATOR):
            stamps.append(time.perf_counter())
        return (stamps[0] - t0) * 1000, stamps

    def raw_cached() -> tuple[float, list[float]]:
        raw()  # leaves exactly this prompt in the cache, so the timed call reuses all of it
        return raw(reset=False)

    raw(), through_service(), raw_cached()  # warm every path
    raw_ttft, svc_ttft, raw_rate, svc_rate, raw_tokens, svc_tokens, cached_ttft = [], [], [], [], [], [], []
    for i in range(args.rounds):
        order = (raw, through_service) if i % 2 == 0 else (through_service, raw)
        for fn in (*order, raw_cached):
            ttft, stamps = fn()
            if fn is raw:
                raw_ttft.append(ttft), raw_rate.append(_decode_rate(stamps)), raw_tokens.append(len(stamps))
            elif fn is through_service:
                svc_ttft.append(ttft), svc_rate.append(_decode_rate(stamps)), svc_tokens.append(len(stamps))
            else:
                cached_ttft.append(ttft)

    print(
        f"rounds={args.rounds} max_tokens={args.max_tokens} "
        f"tokens raw={median(raw_tokens)} service={median(svc_tokens)}"
    )
    print(f"raw      TTFT median {median(raw_ttft):7.2f} ms   decode {median(raw_rate):7.1f} tok/s")
    print(f"service  TTFT median {median(svc_ttft):7.2f} ms   decode {median(svc_rate):7.1f} tok/s")
    print(f"raw with the prompt cached: TTFT median {median(cached_ttft):7.2f} ms")
    emit(
        raw_decode_tps=median(raw_rate),
        service_decode_tps=median(svc_rate),
        decode_ratio=median(svc_rate) / median(raw_rate),
        raw_ttft_ms=median(raw_ttft),
        service_ttft_ms=median(svc_ttft),
        ttft_overhead_ms=median(svc_ttft) - median(raw_ttft),
        cached_ttft_ms=median(cached_ttft),
        seed_reset_ttft_ms=median(raw_ttft) - median(cached_ttft),
        peak_rss_mb=peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
