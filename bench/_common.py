"""Helpers shared by the benchmark scripts: percentiles, peak memory, the RESULT line."""

from __future__ import annotations

import resource
import statistics
import sys


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_line(**values: float | int | str) -> str:
    parts = []
    for name, value in values.items():
        parts.append(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}")
    return "RESULT " + " ".join(parts)


def emit(**values: float | int | str) -> None:
    print(result_line(**values))
    sys.stdout.flush()


# Caller questions and bot answers for seeded stores: varied words, realistic lengths.
QUESTIONS = [
    "What are your opening hours?",
    "Can I book an appointment for Tuesday morning?",
    "My order hasn't arrived yet, can you check it?",
    "How much does the premium plan cost?",
    "Could you explain the past perfect tense?",
    "Is there parking near the clinic?",
    "I'd like to cancel my subscription.",
    "Do you offer a discount for students?",
    "How do I reset my password?",
    "Can you remind me what we discussed last week?",
    "What documents should I bring?",
    "Is the doctor available on Saturday?",
    "Can I pay by card over the phone?",
    "What's the difference between 'since' and 'for'?",
    "Please summarise the options again.",
]

ANSWERS = [
    "We're open Monday to Friday from 8am to 6pm, and on Saturday mornings from 9am to noon.",
    "Certainly. I have 9:30 or 11:00 available on Tuesday; which would suit you better?",
    "I'm sorry about the delay. Let me look that up: your parcel left our warehouse yesterday.",
    "The premium plan is 29 euros a month, billed monthly, and you can cancel at any time.",
    "We use the past perfect for an action that happened before another past action.",
    "Yes, there's a public car park right behind the building, free for the first two hours.",
    "I can help with that. Before I cancel, may I ask what made you decide to leave?",
    "We do: students get 20 percent off with a valid student card.",
    "Use the 'Forgot password' link on the sign-in page and follow the email we send you.",
    "Of course. Is there anything else I can help you with today?",
]

# Conversation summaries for seeded stores.
SUMMARIES = [
    "The caller asked about opening hours and booked an appointment.",
    "The customer reported a late order; the agent tracked the parcel and promised an update.",
    "The prospect asked about pricing and agreed to a follow-up call.",
    "The learner practised tenses and asked for more examples.",
    "The user asked general questions and was satisfied with the answers.",
]


def fresh_postgres_database(url: str, database: str):  # type: ignore[no-untyped-def]
    """A Store on an emptied database of its own on `url`'s server: a bench never touches test data."""
    from sqlalchemy import create_engine, make_url, text

    from callbot_core.store import Store

    server = make_url(url)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    return Store(server.set(database=database).render_as_string(hide_password=False))
