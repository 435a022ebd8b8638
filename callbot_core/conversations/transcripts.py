"""Reading stored conversations: lists with their metrics, one conversation in full, search, export.

Front ends call these and render; they never write SQL themselves.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Literal

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.conversations.turn import reconcile_turns
from callbot_core.csv_safety import safe_csv_cell
from callbot_core.errors import InvalidInput, NotFound
from callbot_core.store import Store
from callbot_core.store.models import Conversation, Message, Persona, PersonaVersion, TurnMetrics, User


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: int
    persona_key: str
    persona_version: int
    username: str | None
    backend: str
    model: str
    channel: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    turns: int
    failed_turns: int
    mean_ttft_ms: float | None
    summary_short: str | None


@dataclass(frozen=True, slots=True)
class Citation:
    """A passage a turn's prompt used, numbered as the reply cites it. `text` is None once its document was
    re-ingested or deleted (the turn still says where the passage came from)."""

    number: int
    source: str
    page: int | None
    heading: str | None
    similarity: float | None
    text: str | None

    @property
    def label(self) -> str:
        return self.source if self.page is None else f"{self.source}, page {self.page}"


@dataclass(frozen=True, slots=True)
class MessageRow:
    id: int
    role: str
    text: str
    created_at: datetime
    token_count: int | None
    # Set on assistant messages (and on user messages of failed turns, with `error`).
    ttft_ms: float | None = None
    total_ms: float | None = None
    tokens_per_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # Retrieval, on a reply whose persona answers from documents: the passages cited, the low-relevance flag and
    # the retrieve stage's time.
    citations: tuple[Citation, ...] = ()
    low_relevance: bool | None = None
    retrieve_ms: float | None = None


@dataclass(frozen=True, slots=True)
class ConversationDetail:
    row: ConversationRow
    system_prompt: str
    summary_full: str | None
    messages: list[MessageRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: int
    source: Literal["message", "summary"]
    message_id: int | None
    role: str | None
    snippet: str
    created_at: datetime


def _rows_query(only_ids: Select | None = None) -> Select:
    """Conversation rows with their turn stats; `only_ids` limits the (costly) aggregation to a page."""
    stats = select(
        TurnMetrics.conversation_id.label("cid"),
        func.count(TurnMetrics.assistant_message_id).label("turns"),
        func.count(TurnMetrics.error).label("failed"),
        func.avg(TurnMetrics.ttft_ms).filter(TurnMetrics.error.is_(None)).label("mean_ttft"),
    ).group_by(TurnMetrics.conversation_id)
    if only_ids is not None:
        stats = stats.where(TurnMetrics.conversation_id.in_(only_ids))
    turn_stats = stats.subquery()
    return (
        select(
            Conversation.id,
            Persona.key,
            PersonaVersion.version,
            User.username,
            Conversation.backend,
            Conversation.model,
            Conversation.channel,
            Conversation.status,
            Conversation.started_at,
            Conversation.ended_at,
            func.coalesce(turn_stats.c.turns, 0),
            func.coalesce(turn_stats.c.failed, 0),
            turn_stats.c.mean_ttft,
            Conversation.summary_short,
        )
        .join(PersonaVersion, PersonaVersion.id == Conversation.persona_version_id)
        .join(Persona, Persona.id == PersonaVersion.persona_id)
        .outerjoin(User, User.id == Conversation.user_id)
        .outerjoin(turn_stats, turn_stats.c.cid == Conversation.id)
    )


def _to_row(r: tuple) -> ConversationRow:
    return ConversationRow(*r[:12], None if r[12] is None else float(r[12]), r[13])


def list_conversations(
    store: Store,
    *,
    persona: str | None = None,
    username: str | None = None,
    status: str | None = None,
    channel: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    ids: Iterable[int] | None = None,
    limit: int | None = 100,
    offset: int = 0,
) -> list[ConversationRow]:
    """Conversations, newest first, each with its turn count and mean TTFT.

    Two steps: pick the page of conversation ids with the filters, then aggregate turn metrics for
    those ids only, so a page costs the same with 100 or 100,000 conversations in the store.
    """
    reconcile_turns(store)  # as `get_conversation`: the list's turn counts then include turns whose process died
    query = (
        select(Conversation.id)
        .join(PersonaVersion, PersonaVersion.id == Conversation.persona_version_id)
        .join(Persona, Persona.id == PersonaVersion.persona_id)
        .outerjoin(User, User.id == Conversation.user_id)
    )
    if persona:
        query = query.where(Persona.key == persona)
    if username:
        query = query.where(User.username == username)
    if status:
        query = query.where(Conversation.status == status)
    if channel:
        query = query.where(Conversation.channel == channel)
    if since:
        query = query.where(Conversation.started_at >= since)
    if until:
        query = query.where(Conversation.started_at < until)
    if ids is not None:
        query = query.where(Conversation.id.in_(list(ids)))
    query = query.order_by(Conversation.id.desc()).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    with store.session() as session:
        page_ids = list(session.scalars(query))
        if not page_ids:
            return []
        rows = session.execute(
            _rows_query(only_ids=select(Conversation.id).where(Conversation.id.in_(page_ids)))
            .where(Conversation.id.in_(page_ids))
            .order_by(Conversation.id.desc())
        )
        return [_to_row(r) for r in rows]


def get_conversation(store: Store, conversation_id: int) -> ConversationDetail:
    # A turn whose process died shows as interrupted, not as a question left hanging (cheap: turns in flight only).
    reconcile_turns(store)
    with store.session() as session:
        one = select(Conversation.id).where(Conversation.id == conversation_id)
        found = session.execute(_rows_query(only_ids=one).where(Conversation.id == conversation_id)).first()
        if found is None:
            raise NotFound(f"Unknown conversation id {conversation_id}")
        conv = session.get(Conversation, conversation_id)
        assert conv is not None
        system_prompt = conv.persona_version.system_prompt
        by_assistant = aliased(TurnMetrics)
        by_user = aliased(TurnMetrics)
        rows = session.execute(
            select(Message, by_assistant, by_user)
            .outerjoin(by_assistant, by_assistant.assistant_message_id == Message.id)
            .outerjoin(by_user, and_(by_user.user_message_id == Message.id, by_user.error.is_not(None)))
            .where(Message.conversation_id == conversation_id)
            .order_by(Message.id)
        )
        citations, retrieve_ms = _retrievals(session, conversation_id)
        messages = []
        for msg, tm, failed in rows:
            metrics = tm or failed
            cited, low = citations.get(tm.id, ((), None)) if tm else ((), None)
            messages.append(
                MessageRow(
                    id=msg.id,
                    role=msg.role,
                    text=msg.text,
                    created_at=msg.created_at,
                    token_count=msg.token_count,
                    ttft_ms=metrics.ttft_ms if tm else None,
                    total_ms=metrics.total_ms if metrics else None,
                    tokens_per_s=metrics.tokens_per_s if tm else None,
                    prompt_tokens=metrics.prompt_tokens if tm else None,
                    completion_tokens=metrics.completion_tokens if tm else None,
                    error=failed.error if failed else None,
                    citations=cited,
                    low_relevance=low,
                    retrieve_ms=retrieve_ms.get(tm.id) if tm else None,
                )
            )
        return ConversationDetail(_to_row(tuple(found)), system_prompt, conv.summary_full, messages)


def _retrievals(
    session: Session, conversation_id: int
) -> tuple[dict[int, tuple[tuple[Citation, ...], bool]], dict[int, float]]:
    """Per turn of the conversation (by turn_metrics id): the passages it used with its low-relevance flag, and its
    retrieve stage's time."""
    from callbot_core.store.models import KnowledgeChunk, TurnRetrieval, TurnStage

    cited: dict[int, tuple[list[Citation], bool]] = {}
    for r, text in session.execute(
        select(TurnRetrieval, KnowledgeChunk.text)
        .join(TurnMetrics, TurnMetrics.id == TurnRetrieval.turn_metrics_id)
        .outerjoin(KnowledgeChunk, KnowledgeChunk.id == TurnRetrieval.chunk_id)
        .where(TurnMetrics.conversation_id == conversation_id)
        .order_by(TurnRetrieval.turn_metrics_id, TurnRetrieval.rank)
    ):
        entry = cited.setdefault(r.turn_metrics_id, ([], r.low_relevance))
        entry[0].append(Citation(r.rank, r.source, r.page, r.heading, r.similarity, text))
    times = dict(
        session.execute(
            select(TurnStage.turn_metrics_id, TurnStage.ms)
            .join(TurnMetrics, TurnMetrics.id == TurnStage.turn_metrics_id)
            .where(TurnMetrics.conversation_id == conversation_id, TurnStage.stage == "retrieve")
        ).all()
    )
    return {k: (tuple(v), low) for k, (v, low) in cited.items()}, times


def delete_conversation(store: Store, conversation_id: int, *, actor: Actor, client_addr: str | None = None) -> None:
    """Delete a conversation with its messages and metrics; the deletion is audited in the same transaction."""
    require(actor, "conversation.delete")
    with store.session() as session:
        conv = session.get(Conversation, conversation_id)
        if conv is None:
            raise NotFound(f"Unknown conversation id {conversation_id}")
        detail = {"persona_version_id": conv.persona_version_id, "started_at": conv.started_at.isoformat()}
        session.delete(conv)
        audit.record(
            session, "conversation.delete", actor=actor.username, target=str(conversation_id), detail=detail,
            client_addr=client_addr,
        )  # fmt: skip


# -- search ------------------------------------------------------------------------------------

_MAX_QUERY_CHARS = 200


def _like_pattern(term: str) -> str:
    escaped = term.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _snippet(text: str, query: str, width: int = 80) -> str:
    words = [w for w in re.findall(r"\w+", query.lower()) if w]
    lower = text.lower()
    pos = lower.find(query.lower())
    if pos < 0:
        pos = min((p for p in (lower.find(w) for w in words) if p >= 0), default=0)
    start = max(0, pos - width // 2)
    piece = text[start : start + width].replace("\n", " ")
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")


def search(store: Store, query: str, *, limit: int = 50) -> list[SearchHit]:
    """Messages and summaries matching `query`, newest first.

    One API, two engines: a case-insensitive substring on SQLite, full-text (`websearch_to_tsquery`,
    so stemming and quoted phrases work) on PostgreSQL.
    """
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("The search is empty: type a word to look for")
    query = query.strip()
    if len(query) > _MAX_QUERY_CHARS:
        raise InvalidInput(f"The search is too long: at most {_MAX_QUERY_CHARS} characters")
    with store.session() as session:
        if store.dialect == "postgresql":
            ts_query = func.websearch_to_tsquery("english", query)
            msg_match = func.to_tsvector("english", Message.text).op("@@")(ts_query)
            sum_match = func.to_tsvector(
                "english",
                func.coalesce(Conversation.summary_short, "") + " " + func.coalesce(Conversation.summary_full, ""),
            ).op("@@")(ts_query)
        else:
            pattern = _like_pattern(query)
            msg_match = func.lower(Message.text).like(pattern, escape="\\")
            sum_match = or_(
                func.lower(Conversation.summary_short).like(pattern, escape="\\"),
                func.lower(Conversation.summary_full).like(pattern, escape="\\"),
            )
        hits: list[SearchHit] = []
        for mid, cid, role, text, created in session.execute(
            select(Message.id, Message.conversation_id, Message.role, Message.text, Message.created_at)
            .where(msg_match)
            .order_by(Message.id.desc())
            .limit(limit)
        ):
            hits.append(SearchHit(cid, "message", mid, role, _snippet(text, query), created))
        for cid, short, full, started in session.execute(
            select(
                Conversation.id,
                Conversation.summary_short,
                Conversation.summary_full,
                Conversation.started_at,
            )
            .where(sum_match)
            .order_by(Conversation.id.desc())
            .limit(limit)
        ):
            hits.append(SearchHit(cid, "summary", None, None, _snippet(f"{short or ''} {full or ''}", query), started))
    hits.sort(key=lambda h: h.created_at, reverse=True)
    return hits[:limit]


# -- export ------------------------------------------------------------------------------------

EXPORT_FORMATS = ("jsonl", "csv")
CSV_COLUMNS = [
    "conversation_id", "persona", "persona_version", "username", "backend", "model", "channel", "status",
    "started_at", "ended_at", "message_id", "role", "text", "created_at", "token_count", "ttft_ms",
    "total_ms", "tokens_per_s", "error",
]  # fmt: skip


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def iter_details(store: Store, ids: Iterable[int]) -> Iterator[ConversationDetail]:
    for cid in ids:
        yield get_conversation(store, cid)


def export_conversations(store: Store, fmt: str, out: IO[str], *, ids: Iterable[int] | None = None) -> int:
    """Write conversations (all, or `ids`) as JSONL (one conversation a line) or CSV (one message a row)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"Export format {fmt!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}")
    if ids is None:
        with store.session() as session:
            ids = list(session.scalars(select(Conversation.id).order_by(Conversation.id)))
    count = 0
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS) if fmt == "csv" else None
    if writer:
        writer.writeheader()
    for detail in iter_details(store, ids):
        row = detail.row
        head = {
            "conversation_id": row.id,
            "persona": row.persona_key,
            "persona_version": row.persona_version,
            "username": row.username,
            "backend": row.backend,
            "model": row.model,
            "channel": row.channel,
            "status": row.status,
            "started_at": _iso(row.started_at),
            "ended_at": _iso(row.ended_at),
        }
        if writer:
            for m in detail.messages:
                writer.writerow(
                    {k: safe_csv_cell(v) for k, v in {
                        **head, "message_id": m.id, "role": m.role, "text": m.text,
                        "created_at": _iso(m.created_at), "token_count": m.token_count,
                        "ttft_ms": m.ttft_ms, "total_ms": m.total_ms, "tokens_per_s": m.tokens_per_s,
                        "error": m.error,
                    }.items()}
                )  # fmt: skip
        else:
            doc = {
                **head,
                "turns": row.turns,
                "mean_ttft_ms": row.mean_ttft_ms,
                "summary_short": row.summary_short,
                "summary_full": detail.summary_full,
                "messages": [{**asdict(m), "created_at": _iso(m.created_at)} for m in detail.messages],
            }
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        count += 1
    return count


def export_to_file(store: Store, fmt: str, path: Path, *, ids: Iterable[int] | None = None) -> int:
    """Export into `path` atomically: a failed export leaves no half-written file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            count = export_conversations(store, fmt, fh, ids=ids)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return count
