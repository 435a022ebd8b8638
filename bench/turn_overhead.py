"""The engine's own work per turn, without waiting on a model.

A backend that yields a fixed reply at once stands in for the model, so what is timed is validation,
store reads, history trimming, prompt building, streaming bookkeeping and the one-transaction write.
Conversations run 10 turns each so history grows as in real use. The baseline, in the same process and
on the same database, is a bare SQLAlchemy Core insert of the turn's three main rows in one transaction (a
turn also writes one `turn_stages` row per stage): `own_vs_insert_ratio` says how many bare writes one whole
turn costs.

Prints p50/p95 in ms on SQLite and on PostgreSQL (the server of `CALLBOT_TEST_DATABASE_URL`, default the local
server, in a database of its own, `callbot_bench`; reported as -1 when unreachable). Target:
`own_p95_ms_sqlite` <= 5.

    .venv/bin/python bench/turn_overhead.py [--conversations 30] [--turns 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from bench._common import emit, fresh_postgres_database, peak_rss_mb, percentile  # noqa: E402
from callbot_core.access.permissions import LOCAL_OPERATOR  # noqa: E402
from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, Token, Usage, estimate_tokens  # noqa: E402
from callbot_core.conversations.service import ConversationService  # noqa: E402
from callbot_core.settings import Settings  # noqa: E402
from callbot_core.store import Store  # noqa: E402
from callbot_core.store.models import Message, TurnMetrics, utcnow  # noqa: E402

REPLY = ["Our", " clinic", " is", " open", " from", " 8am", " to", " 6pm", " on", " weekdays", "."]


class FixedReply:
    """Yields a fixed reply at once: the model's time is taken out of the measurement."""

    name = "fixed"
    where = "in-process"
    default_model = "fixed"

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]:
        for piece in REPLY:
            yield Token(piece)
        yield Token(
            "",
            usage=Usage(prompt_tokens=sum(estimate_tokens(m.content) for m in messages), completion_tokens=len(REPLY)),
        )

    def list_models(self) -> list[str]:
        return ["fixed"]

    def health(self) -> Health:
        return Health(True, self.name, self.where)

    def context_window(self, model: str | None = None) -> int:
        return 4096

    def count_tokens(self, text: str, model: str | None = None) -> int:
        return estimate_tokens(text)


BENCH_DB = "callbot_bench"


def _fresh_postgres(url: str) -> Store:
    return fresh_postgres_database(url, BENCH_DB)


def measure(store: Store, settings: Settings, conversations: int, turns: int) -> tuple[list[float], list[float]]:
    store.upgrade()
    backend = FixedReply()
    service = ConversationService(store, settings, backends=lambda name: backend)
    for _ in range(3):  # warm-up: connection pool, statement caches
        c = service.start("receptionist", actor=LOCAL_OPERATOR)
        service.send(c.id, "warm up", actor=LOCAL_OPERATOR).text()
    own: list[float] = []
    for _ in range(conversations):
        conv = service.start("receptionist", actor=LOCAL_OPERATOR)
        for t in range(turns):
            t0 = time.perf_counter()
            service.send(conv.id, f"Question number {t}: when are you open?", actor=LOCAL_OPERATOR).text()
            own.append((time.perf_counter() - t0) * 1000)
    baseline: list[float] = []
    conv = service.start("receptionist", actor=LOCAL_OPERATOR)
    for t in range(len(own)):
        t0 = time.perf_counter()
        with store.engine.begin() as conn:
            now = utcnow()
            common = {"conversation_id": conv.id, "created_at": now}
            uid = conn.execute(
                insert(Message).values(role="user", text=f"q{t}", **common).returning(Message.id)
            ).scalar_one()
            bid = conn.execute(
                insert(Message).values(role="assistant", text="a", **common).returning(Message.id)
            ).scalar_one()
            conn.execute(
                insert(TurnMetrics).values(
                    user_message_id=uid,
                    assistant_message_id=bid,
                    backend="fixed",
                    model="fixed",
                    trimmed_messages=0,
                    **common,
                )  # fmt: skip
            )
        baseline.append((time.perf_counter() - t0) * 1000)
    return own, baseline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=30)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="callbot-bench-"))
    results: dict[str, float] = {}

    targets = [("sqlite", f"sqlite:///{tmp / 'bench.db'}")]
    pg_url = os.environ.get("CALLBOT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    targets.append(("postgres", pg_url))
    for label, url in targets:
        try:
            store = _fresh_postgres(url) if label == "postgres" else Store(url)
            url = store.url
            settings = Settings(_env_file=None, database_url=url, runtime_dir=tmp)  # type: ignore[call-arg]
            own, base = measure(store, settings, args.conversations, args.turns)
        except Exception as exc:  # PostgreSQL down: say so, report -1, still measure SQLite
            print(f"{label}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            results |= {f"own_p50_ms_{label}": -1.0, f"own_p95_ms_{label}": -1.0}
            continue
        p50, p95, b50 = percentile(own, 0.5), percentile(own, 0.95), percentile(base, 0.5)
        print(f"{label:8s} turns={len(own)} own p50 {p50:.2f} ms p95 {p95:.2f} ms | bare 3-row insert p50 {b50:.2f} ms")
        results |= {
            f"own_p50_ms_{label}": p50,
            f"own_p95_ms_{label}": p95,
            f"insert_p50_ms_{label}": b50,
            f"own_vs_insert_ratio_{label}": p50 / b50,
        }
        store.dispose()
    emit(**results, peak_rss_mb=peak_rss_mb())


if __name__ == "__main__":
    main()
