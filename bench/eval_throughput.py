"""Suite throughput: a N-case suite against 2 persona versions on the embedded model, sequential vs concurrent.

A case is one caller turn with its assertions (max_words, not_contains, a similar_to that always
passes, so the embedding model does real work). The same suite runs once with `concurrency=1` and
once with the runner's default concurrency (2), and the script prints cases/s for each and their
ratio `concurrency_speedup`.

The embedded model generates one reply at a time (one llama.cpp context behind a lock), so the
runner takes turns on the model for such backends and overlaps only the rest of the work (assertion
embeddings, judging, store writes) with the other cell's generation. Expect a speedup near 1: the
point is that concurrency costs nothing on the embedded model and helps on remote backends.

    .venv/bin/python bench/eval_throughput.py [--cases 20] [--max-tokens 24] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import QUESTIONS, emit, peak_rss_mb  # noqa: E402
from callbot_core.access.permissions import LOCAL_OPERATOR  # noqa: E402
from callbot_core.backends.embeddings import default_embedder  # noqa: E402
from callbot_core.backends.llm import get_backend  # noqa: E402
from callbot_core.conversations.service import ConversationService  # noqa: E402
from callbot_core.experiments.evals import AssertionContext, parse_suite, run_suite  # noqa: E402
from callbot_core.personas.versions import save_version  # noqa: E402
from callbot_core.settings import Settings  # noqa: E402
from callbot_core.store import Store  # noqa: E402
from callbot_core.store.seeds import seed_default_personas  # noqa: E402


def suite_text(cases: int) -> str:
    lines = ["name: throughput", "turns:"]
    for i in range(cases):
        question = QUESTIONS[i % len(QUESTIONS)].replace("'", "''")
        lines += [
            f"  - say: '{question}'",
            "    expect:",
            "      - max_words: 200",
            "      - not_contains: zzzz",
            "      - similar_to: We are happy to help you with that.",
            "        threshold: -1",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    store = Store(f"sqlite:///{tmp / 'bench.db'}")
    store.upgrade()
    seed_default_personas(store)
    v2 = save_version(
        store, "receptionist", {"system_prompt": "You are a brief, friendly clinic receptionist."}, actor=LOCAL_OPERATOR
    )
    settings = Settings(_env_file=None, llm_backend="embedded", database_url=str(store.engine.url))  # type: ignore[call-arg]
    backend = get_backend("embedded", settings)
    service = ConversationService(store, settings, backends=lambda name: backend)
    context = AssertionContext(embedder=default_embedder)
    suite = parse_suite(suite_text(args.cases), source="throughput.yaml")
    refs = ["receptionist@1", v2.ref]
    grid = {"max_tokens": [args.max_tokens], "temperature": [0.2], "seed": [7]}

    # Warm-up: load the model and the embedder so neither mode pays for it.
    run_suite(
        service,
        parse_suite(suite_text(1)),
        refs[:1],
        params_grid=grid,
        concurrency=1,
        context=context,
        actor=LOCAL_OPERATOR,
    )

    # Modes alternate round by round so machine noise hits both alike; each mode reports its median round.
    timings: dict[int, list[float]] = {1: [], 2: []}
    cases = args.cases * len(refs)
    for round_no in range(1, args.rounds + 1):
        for concurrency in (1, 2):
            started = time.perf_counter()
            batch = run_suite(
                service, suite, refs, params_grid=grid, concurrency=concurrency, context=context, actor=LOCAL_OPERATOR
            )
            elapsed = time.perf_counter() - started
            errors = [c.error for c in batch.cells if c.error]
            if errors:
                sys.exit(f"suite cells failed: {errors}")
            timings[concurrency].append(elapsed)
            label = "sequential" if concurrency == 1 else f"concurrent ({concurrency})"
            print(f"round {round_no} {label:>16}: {cases} cases in {elapsed:6.2f} s = {cases / elapsed:.3f} cases/s")
    rates = {c: cases / statistics.median(t) for c, t in timings.items()}
    print(f"median: sequential {rates[1]:.3f} cases/s, concurrent {rates[2]:.3f} cases/s")
    speedup = rates[2] / rates[1]
    print(f"concurrency_speedup: {speedup:.3f} (the embedded model generates one reply at a time)")
    store.dispose()
    emit(
        cases=cases,
        cases_per_s_sequential=rates[1],
        cases_per_s_concurrent=rates[2],
        concurrency_speedup=speedup,
        peak_rss_mb=peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
