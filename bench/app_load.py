"""How fast the browser app's pages become usable on a store with a realistic history.

Seeds a fresh SQLite store with 10,000 conversations (100,000 messages: 5 user/assistant turns each, a
turn_metrics row per turn, spread over 60 days, the 5 default personas, user `admin`) using SQLAlchemy
Core executemany, then starts the real app (`callbot app`) on it and drives Debian's chromium with
Playwright. Each figure is the median of 5 runs:

- `chat_ready_s`: page.goto(BASE/chat) until the "New conversation" button is enabled;
- `conversations_ready_s`: page.goto(BASE/conversations) until the conversations table is visible;
- `chat_click_s`, `conversations_click_s`: the same pages reached by their sidebar links (same session,
  no page load), for comparison.

A page.goto opens a new Streamlit session, so it stays signed in through the sign-in cookie the app set
when the bench signed in through the form: what is timed is "open a bookmarked page while signed in".
Targets: `chat_ready_s` <= 2 and `conversations_ready_s` <= 2.

    .venv/bin/python bench/app_load.py [--conversations 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from bench._common import ANSWERS, QUESTIONS, SUMMARIES, emit, median, peak_rss_mb  # noqa: E402
from callbot_core.access.signin import ensure_admin  # noqa: E402
from callbot_core.store import Store  # noqa: E402
from callbot_core.store.models import Conversation, Message, Persona, PersonaVersion, TurnMetrics, User  # noqa: E402
from tests.browser.helpers import (  # noqa: E402
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    chromium_missing_reason,
    launch_chromium,
    process_rss_mb,
    running_app,
    screenshot,
    sign_in,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

TURNS_PER_CONVERSATION = 5  # 10 messages: user, assistant, user, assistant, …
DAYS = 60
CHUNK = 20_000  # rows per executemany: bounded memory, still one statement per thousands of rows
READY_TIMEOUT_MS = 30_000
MODEL = "SmolLM2-135M-Instruct.Q4_1"


def _persona_versions(store: Store) -> list[int]:
    with store.session() as session:
        return list(
            session.scalars(
                select(func.max(PersonaVersion.id))
                .join(Persona, Persona.id == PersonaVersion.persona_id)
                .group_by(Persona.id)
                .order_by(Persona.id)
            )
        )


def seed(store: Store, conversations: int, *, rng_seed: int = 1234) -> dict[str, int]:
    """Bulk-insert `conversations` conversations with their messages and turn metrics; returns row counts.

    Ids are assigned here rather than read back after each insert: with them known up front, every
    table is written with a handful of executemany calls instead of one round trip per row.
    """
    rng = random.Random(rng_seed)
    version_ids = _persona_versions(store)
    # Skewed like real use: the receptionist and support personas get most of the calls.
    weights = [5, 4, 2, 2, 1][: len(version_ids)]
    with store.session() as session:
        admin_id = session.scalar(select(User.id).where(User.username == ADMIN_USERNAME))
        next_conv = (session.scalar(select(func.max(Conversation.id))) or 0) + 1
        next_msg = (session.scalar(select(func.max(Message.id))) or 0) + 1
        next_metric = (session.scalar(select(func.max(TurnMetrics.id))) or 0) + 1

    now = datetime.now(UTC)
    conv_rows: list[dict[str, Any]] = []
    msg_rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    counts = {"conversations": 0, "messages": 0, "turn_metrics": 0}

    def flush(conn: Any, force: bool = False) -> None:
        if not force and len(msg_rows) < CHUNK:
            return
        # Parents before children: foreign keys are enforced on SQLite too (PRAGMA foreign_keys=ON).
        for table, rows in ((Conversation, conv_rows), (Message, msg_rows), (TurnMetrics, metric_rows)):
            if rows:
                conn.execute(table.__table__.insert(), rows)
                counts[table.__tablename__] += len(rows)
                rows.clear()

    with store.engine.begin() as conn:
        for _ in range(conversations):
            cid = next_conv
            next_conv += 1
            started = now - timedelta(seconds=rng.uniform(0, DAYS * 86400))
            ended = rng.random() < 0.9
            at = started
            prompt_tokens = 60
            for _turn in range(TURNS_PER_CONVERSATION):
                at += timedelta(seconds=rng.uniform(5, 40))
                question = rng.choice(QUESTIONS)
                user_id = next_msg
                msg_rows.append(
                    {
                        "id": user_id,
                        "conversation_id": cid,
                        "role": "user",
                        "text": question,
                        "created_at": at,
                        "token_count": len(question) // 4,
                    }
                )
                # Latencies as the embedded model shows them: TTFT around 250 ms with a long tail,
                # 30-150 tokens at 50-170 tokens/s.
                ttft = rng.lognormvariate(5.5, 0.35)
                tokens = rng.randint(30, 150)
                tps = rng.uniform(50, 170)
                total = ttft + tokens / tps * 1000
                at += timedelta(milliseconds=total)
                answer = rng.choice(ANSWERS)
                assistant_id = user_id + 1
                msg_rows.append(
                    {
                        "id": assistant_id,
                        "conversation_id": cid,
                        "role": "assistant",
                        "text": answer,
                        "created_at": at,
                        "token_count": tokens,
                    }
                )
                next_msg += 2
                prompt_tokens += len(question) // 4 + tokens
                metric_rows.append(
                    {
                        "id": next_metric,
                        "conversation_id": cid,
                        "user_message_id": user_id,
                        "assistant_message_id": assistant_id,
                        "backend": "embedded",
                        "model": MODEL,
                        "ttft_ms": ttft,
                        "total_ms": total,
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": tokens,
                        "tokens_per_s": tps,
                        "trimmed_messages": 0,
                        "created_at": at,
                    }
                )
                next_metric += 1
            summary = rng.choice(SUMMARIES)
            conv_rows.append(
                {
                    "id": cid,
                    "user_id": admin_id,
                    "persona_version_id": rng.choices(version_ids, weights)[0],
                    "backend": "embedded",
                    "model": MODEL,
                    "channel": "text",
                    "started_at": started,
                    "ended_at": at + timedelta(seconds=5) if ended else None,
                    "status": "ended" if ended else "active",
                    "summary_short": summary if ended else None,
                    "summary_full": f"{summary} {summary}" if ended else None,
                }
            )
            flush(conn)
        flush(conn, force=True)
    return counts


def _timed(page: Page, name: str, action: Callable[[], None], ready: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    try:
        ready()
    except Exception:
        # A page that never gets ready is a finding: keep what the browser showed.
        shot = screenshot(page, f"app_load_{name}_not_ready")
        print(f"{name}: not ready; screenshot {shot}; page text:\n{page.inner_text('body')[:1500]}", file=sys.stderr)
        raise
    return time.perf_counter() - start


def _chat_ready(page: Page) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_role("button", name="New conversation")).to_be_enabled(timeout=READY_TIMEOUT_MS)


def _conversations_ready(page: Page) -> None:
    page.locator("[data-testid=stDataFrame], [data-testid=stTable]").first.wait_for(
        state="visible", timeout=READY_TIMEOUT_MS
    )


def _conversations_from_url(page: Page, redirected: list[bool]) -> None:
    """Ready after page.goto(BASE/conversations); if the app lands on Chat instead, go on by the sidebar link.

    A deep link must survive the sign-in cookie's rerun (the app remembers the wanted page); should it
    ever be lost again, the time includes the detour and `redirected` (so conversations_deep_link_ok=0) says so.
    """
    table = page.locator("[data-testid=stDataFrame], [data-testid=stTable]").first
    chat = page.get_by_role("button", name="New conversation")
    table.or_(chat).first.wait_for(state="visible", timeout=READY_TIMEOUT_MS)
    if not table.is_visible() and chat.is_visible():
        redirected.append(True)
        page.get_by_role("link", name="Conversations", exact=True).click()
    _conversations_ready(page)


def _check_signed_in(page: Page, where: str) -> None:
    from playwright.sync_api import expect

    sign_out = page.get_by_role("button", name="Sign out")
    login = page.get_by_text("Sign in to Callbot Workbench")
    expect(sign_out.or_(login).first).to_be_visible(timeout=READY_TIMEOUT_MS)
    if not sign_out.is_visible():
        raise RuntimeError(f"{where}: the app showed its sign-in form; its sign-in cookie was not accepted")


def measure(base_url: str, runs: int) -> tuple[dict[str, list[float]], int]:
    """Per-run times of the four navigations, and how many /conversations loads were redirected to Chat."""
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {"chat_goto": [], "conv_goto": [], "chat_click": [], "conv_click": []}
    redirected: list[bool] = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()

        def chat_goto() -> float:
            return _timed(page, "chat_goto", lambda: page.goto(base_url + "/chat"), lambda: _chat_ready(page))

        def conv_goto() -> float:
            return _timed(
                page,
                "conversations_goto",
                lambda: page.goto(base_url + "/conversations"),
                lambda: _conversations_from_url(page, redirected),
            )

        def chat_click() -> float:
            link = page.get_by_role("link", name="Chat", exact=True)
            return _timed(page, "chat_click", link.click, lambda: _chat_ready(page))

        def conv_click() -> float:
            link = page.get_by_role("link", name="Conversations", exact=True)
            return _timed(page, "conversations_click", link.click, lambda: _conversations_ready(page))

        # A real sign-in first: it exercises the form and warms the app (page scripts, the model list).
        sign_in(page, base_url, ADMIN_USERNAME, ADMIN_PASSWORD)
        warm_chat = chat_goto()
        _check_signed_in(page, "/chat")
        warm_conv = conv_goto()
        redirected.clear()
        print(f"warm-up  chat {warm_chat:.3f} s  conversations {warm_conv:.3f} s (not counted)", flush=True)

        for run in range(1, runs + 1):
            # Order matters for the link clicks: each starts from the other page.
            values = (chat_goto(), conv_goto(), chat_click(), conv_click())
            for key, value in zip(times, values, strict=True):
                times[key].append(value)
            print(
                f"run {run}  goto: chat {values[0]:.3f} s  conversations {values[1]:.3f} s | "
                f"nav link: chat {values[2]:.3f} s  conversations {values[3]:.3f} s",
                flush=True,
            )
        browser.close()
    return times, len(redirected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    missing = chromium_missing_reason()
    if missing:
        sys.exit(f"app_load needs a browser: {missing}")

    with tempfile.TemporaryDirectory(prefix="callbot-app-load-") as tmp:
        workdir = Path(tmp)

        url = f"sqlite:///{workdir / 'callbot.db'}"
        store = Store(url)
        store.upgrade()
        ensure_admin(store, ADMIN_PASSWORD)
        start = time.perf_counter()
        counts = seed(store, args.conversations)
        seed_s = time.perf_counter() - start
        store.dispose()
        db_mb = (workdir / "callbot.db").stat().st_size / 1e6
        print(
            f"seeded {counts['conversations']} conversations, {counts['messages']} messages, "
            f"{counts['turn_metrics']} turn_metrics in {seed_s:.2f} s ({db_mb:.0f} MB)",
            flush=True,
        )

        # The store is migrated and seeded already: `callbot db upgrade` again would only be a no-op.
        with running_app(workdir, database_url=url, upgrade=False) as app:
            times, redirected = measure(app.base_url, args.runs)
            app_rss = process_rss_mb(app.process.pid)

    chat_s, conv_s = median(times["chat_goto"]), median(times["conv_goto"])
    print(
        f"median of {args.runs}: goto chat {chat_s:.3f} s, conversations {conv_s:.3f} s | nav link chat "
        f"{median(times['chat_click']):.3f} s, conversations {median(times['conv_click']):.3f} s (target <= 2 s)"
    )
    if redirected:
        print(
            f"note: {redirected} of {args.runs} loads of /conversations landed on Chat (deep link lost); "
            "conversations_ready_s includes the click through to Conversations"
        )
    emit(
        chat_ready_s=chat_s,
        conversations_ready_s=conv_s,
        chat_click_s=median(times["chat_click"]),
        conversations_click_s=median(times["conv_click"]),
        conversations_deep_link_ok=int(redirected == 0),
        seed_s=seed_s,
        conversations=counts["conversations"],
        messages=counts["messages"],
        peak_rss_mb=peak_rss_mb(),
        app_rss_mb=app_rss,
    )


if __name__ == "__main__":
    main()
