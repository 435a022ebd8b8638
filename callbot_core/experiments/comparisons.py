"""Side by side: the same caller turns sent to 2-4 persona versions or parameter variants at once.

Each variant is an ordinary stored conversation (so transcripts, analytics and exports see it like any
other), linked to one `Comparison` row. A turn goes to every variant concurrently, except that variants on a
serial backend (the embedded model) run one after another so that their latencies can be compared; the user
then marks the reply they prefer. A blind comparison shuffles its columns once, when it starts (Variant A is
not always the first variant set up), and the page hides which variant is which until the user has voted.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.backends.llm import GenerationParams, runs_serially
from callbot_core.conversations.service import ConversationService, TurnStream, mark_ended
from callbot_core.conversations.validation import clean_message
from callbot_core.errors import CallbotError, Conflict, InvalidInput, NotFound
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.fields import FIELDS, check_overrides, params_for
from callbot_core.store import Store
from callbot_core.store.models import (
    Comparison,
    ComparisonVariant,
    ComparisonVote,
    Conversation,
    Message,
    PersonaVersion,
    TurnMetrics,
    utcnow,
)

MIN_VARIANTS = 2
MAX_VARIANTS = 4
LABELS = ("A", "B", "C", "D")
# The sampling settings a variant may override (their ranges are in personas/fields.py).
PARAM_KEYS = tuple(FIELDS)
# Shuffles blind comparisons' columns: the OS's randomness, so no seed or earlier comparison predicts an order.
_SHUFFLE = random.SystemRandom()

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Variant:
    """One column to compare: a persona version (`key@version`) and optional sampling overrides."""

    persona_ref: str
    params: dict[str, Any] | None = None
    label: str | None = None


@dataclass(frozen=True, slots=True)
class VariantInfo:
    id: int
    position: int  # the column, label A first
    label: str
    conversation_id: int
    persona_key: str
    persona_version: int
    backend: str
    model: str
    params: dict[str, Any]
    votes: int = 0
    # Where it was in the list the comparison was started with (0 first); equals `position` unless blind.
    setup_position: int = 0

    @property
    def ref(self) -> str:
        return f"{self.persona_key}@{self.persona_version}"

    def describe(self) -> str:
        """`key@version` plus the overrides, e.g. `receptionist@2 · temperature=0.2`."""
        extra = " · ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.ref} · {extra}" if extra else self.ref


@dataclass(frozen=True, slots=True)
class ComparisonInfo:
    id: int
    title: str
    blind: bool
    created_at: datetime
    variants: list[VariantInfo]


@dataclass(frozen=True, slots=True)
class VariantReply:
    """One variant's answer to one turn; `error` is set (and `text` empty) when that variant failed."""

    variant_id: int
    label: str
    text: str
    ttft_ms: float | None
    tokens_per_s: float | None
    completion_tokens: int | None
    words: int
    error: str | None = None
    total_ms: float | None = None


@dataclass(frozen=True, slots=True)
class ComparisonTurn:
    index: int
    user_text: str
    # In variant order; None where a variant has no row for this turn (it could not be sent at all).
    replies: list[VariantReply | None]


@dataclass(frozen=True, slots=True)
class VoteInfo:
    turn_index: int
    variant_id: int
    voter_id: int | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ComparisonDetail:
    id: int
    title: str
    blind: bool
    created_at: datetime
    created_by: int | None
    variants: list[VariantInfo]
    turns: list[ComparisonTurn] = field(default_factory=list)
    votes: list[VoteInfo] = field(default_factory=list)

    def vote_of(self, turn_index: int, voter_id: int | None) -> int | None:
        """The variant id this voter preferred at this turn, or None."""
        return next((v.variant_id for v in self.votes if v.turn_index == turn_index and v.voter_id == voter_id), None)

    def reveal(self, turn_index: int, voter_id: int | None) -> bool:
        """Whether this voter may see which variant is which at this turn.

        Blind comparisons hide identities until the voter has voted on that turn, so the preference is
        given on the replies alone; open comparisons always show them.
        """
        return not self.blind or self.vote_of(turn_index, voter_id) is not None

    def tally(self) -> dict[int, int]:
        """Votes per variant id, every variant present (zero when it has none)."""
        counts = {v.id: 0 for v in self.variants}
        for vote in self.votes:
            counts[vote.variant_id] = counts.get(vote.variant_id, 0) + 1
        return counts


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    id: int
    title: str
    blind: bool
    created_at: datetime
    variants: int
    votes: int


# -- validation ---------------------------------------------------------------------------------


def validate_params(params: object) -> dict[str, Any]:
    """Sampling overrides checked against the ranges GenerationParams and the persona editor accept."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"Variant parameters must be an object, not {params!r}")
    # In FIELDS order, so stored params and their labels read the same everywhere.
    return check_overrides(params, what="variant parameter")


def _get(session: Session, comparison_id: object) -> Comparison:
    if isinstance(comparison_id, bool) or not isinstance(comparison_id, int):
        raise InvalidInput(f"A comparison id must be a whole number, not {comparison_id!r}")
    comparison = session.get(Comparison, comparison_id)
    if comparison is None:
        raise NotFound(f"Comparison {comparison_id} does not exist")
    return comparison


def _variants(session: Session, comparison_id: int) -> list[tuple[ComparisonVariant, Conversation, PersonaVersion]]:
    rows = session.execute(
        select(ComparisonVariant, Conversation, PersonaVersion)
        .join(Conversation, Conversation.id == ComparisonVariant.conversation_id)
        .join(PersonaVersion, PersonaVersion.id == Conversation.persona_version_id)
        .where(ComparisonVariant.comparison_id == comparison_id)
        .order_by(ComparisonVariant.position)
    )
    return [(v, c, p) for v, c, p in rows]


def _variant_info(variant: ComparisonVariant, conversation: Conversation, version: PersonaVersion) -> VariantInfo:
    return VariantInfo(
        id=variant.id,
        position=variant.position,
        label=variant.label,
        conversation_id=variant.conversation_id,
        persona_key=version.persona.key,
        persona_version=version.version,
        backend=conversation.backend,
        model=conversation.model,
        params=dict(variant.params or {}),
        setup_position=variant.setup_position,
    )


# -- starting -----------------------------------------------------------------------------------


def start_comparison(
    service: ConversationService,
    variants: Sequence[Variant],
    *,
    actor: Actor,
    title: str = "",
    blind: bool = False,
    backend: str | None = None,
    model: str | None = None,
    rng: random.Random | None = None,
) -> ComparisonInfo:
    """Open one stored conversation per variant and link them to a new comparison created by `actor`.

    Everything that can be refused (permission, count, persona refs, parameters, two variants that are the same)
    is checked before anything is stored; if opening a conversation still fails, the ones already opened are
    removed again. A blind comparison shuffles the variants into its columns (with `rng`, the OS's randomness
    unless given) and names the columns A, B, … itself; an open one keeps them in the order given.
    """
    require(actor, "compare")
    user_id = getattr(actor, "id", None)
    if not MIN_VARIANTS <= len(variants) <= MAX_VARIANTS:
        raise InvalidInput(f"A comparison needs {MIN_VARIANTS} to {MAX_VARIANTS} variants, not {len(variants)}")
    if not isinstance(title, str):
        raise InvalidInput(f"A comparison title must be text, not {title!r}")
    title = title.strip()[:200]
    checked = [validate_params(v.params) for v in variants]
    store = service.store
    with store.session() as session:
        # Raises NotFound / InvalidInput naming the ref.
        versions = [get_persona_version(session, variant.persona_ref) for variant in variants]
        _refuse_identical(service, versions, checked, backend, model)
    if blind and any((v.label or "").strip() for v in variants):
        raise InvalidInput(
            "A blind comparison names its variants A, B, … itself: a label of your own would tell them apart"
        )
    blind = bool(blind)
    # order[position] = the index the variant had in `variants`: the column it is shown in, shuffled when blind.
    order = list(range(len(variants)))
    if blind:
        (rng or _SHUFFLE).shuffle(order)
    labels = [(variants[i].label or "").strip()[:40] or LABELS[position] for position, i in enumerate(order)]
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"Variant labels must differ, got {', '.join(labels)}")

    opened: list[int] = []  # in column order
    try:
        for i in order:
            info = service.start(variants[i].persona_ref, actor=actor, backend=backend, model=model, channel="text")
            opened.append(info.id)
        with store.session() as session:
            comparison = Comparison(title=title, created_by=user_id, blind=blind)
            session.add(comparison)
            session.flush()
            for position, (i, cid, label) in enumerate(zip(order, opened, labels, strict=True)):
                session.add(
                    ComparisonVariant(
                        comparison_id=comparison.id,
                        position=position,
                        setup_position=i,
                        label=label,
                        conversation_id=cid,
                        params=checked[i] or None,
                    )
                )
            audit.record(
                session,
                "comparison.start",
                actor=actor.username,
                target=f"comparison#{comparison.id}",
                detail={
                    "variants": [
                        {"label": lb, "persona": variants[i].persona_ref, "params": checked[i], "setup": i}
                        for lb, i in zip(labels, order, strict=True)
                    ],
                    "blind": blind,
                },
            )
            comparison_id = comparison.id
    except Exception:
        # Half a comparison is worse than none: drop the conversations opened for it.
        if opened:
            with store.session() as session:
                for cid in opened:
                    row = session.get(Conversation, cid)
                    if row is not None:
                        session.delete(row)
        raise
    detail = get_comparison(store, comparison_id)
    return ComparisonInfo(detail.id, detail.title, detail.blind, detail.created_at, detail.variants)


def _refuse_identical(
    service: ConversationService,
    versions: Sequence[PersonaVersion],
    params: Sequence[dict[str, Any]],
    backend: str | None,
    model: str | None,
) -> None:
    """Refuse two variants that would run the same thing: the same persona version with the same sampling (the
    overrides on top of the version's own, so `temperature=0.5` on a version whose own is 0.5 is no change) on the
    same backend and model. Their columns could differ only by chance, and a blind vote between them means nothing.
    """
    seen: dict[tuple[Any, ...], int] = {}
    for n, (version, overrides) in enumerate(zip(versions, params, strict=True), start=1):
        runs_on = backend or version.backend or service.settings.llm_backend
        key = (version.id, params_for(version, overrides), runs_on, model or version.model)
        first = seen.setdefault(key, n)
        if first != n:
            ref = f"{version.persona.key}@{version.version}"
            raise InvalidInput(
                f"Variants {first} and {n} are the same: {ref} with the same parameters on {runs_on}"
                + (f" · {model or version.model}" if model or version.model else "")
                + ". Change the persona, the version or a parameter of one of them"
            )


# -- turns --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Job:
    info: VariantInfo
    params: GenerationParams


@dataclass(frozen=True, slots=True)
class ReplyEvent:
    """One step of a comparison turn as it streams: the next `piece` of a variant's reply, or (`reply` set) that
    variant's end, stored."""

    variant_id: int
    piece: str = ""
    reply: VariantReply | None = None


def _serial(service: ConversationService, backend: str) -> bool:
    try:
        return runs_serially(service.backend(backend))
    except CallbotError:  # a backend that cannot be had fails in its own variant's turn, stored there
        return False


def running_order(service: ConversationService, variants: Sequence[VariantInfo]) -> list[list[VariantInfo]]:
    """How a turn runs `variants`: each group one after another, the groups side by side.

    Variants on a serial backend (the embedded model answers one request at a time) form one group, in column
    order, so each one's TTFT is its own and not a wait for another's turn; every other variant is a group of its
    own, run at the same time as the rest.
    """
    serial_backends = {b for b in {v.backend for v in variants} if _serial(service, b)}
    serial = [v for v in variants if v.backend in serial_backends]
    return ([serial] if serial else []) + [[v] for v in variants if v.backend not in serial_backends]


def _failed_reply(info: VariantInfo, error: str) -> VariantReply:
    return VariantReply(info.id, info.label, "", None, None, None, 0, error)


def _stream_one(
    info: VariantInfo, stream: TurnStream | str, cancel: threading.Event | None
) -> Generator[ReplyEvent, None, VariantReply]:
    """Run one variant's turn, yielding its pieces; a failure becomes this variant's reply, not an exception.

    `stream` is the error text when the turn could not even start. A set `cancel` stops reading: the turn is then
    stored as interrupted, as is one whose reader stops (closes this generator).
    """
    if isinstance(stream, str):
        return _failed_reply(info, stream)
    error: str | None = None
    try:
        with stream:  # a reply not read to the end is stored as interrupted when the block is left
            for piece in stream:
                yield ReplyEvent(info.id, piece)
                if cancel is not None and cancel.is_set():
                    break
    except CallbotError as exc:
        error = str(exc)
    except Exception as exc:  # a bug in one backend must not take the other columns down with it
        error = f"{type(exc).__name__}: {exc}"
    result = stream.result
    if result is None:
        return _failed_reply(info, error or "the turn did not run")
    reply_text = result.text if result.error is None and error is None else ""
    return VariantReply(
        variant_id=info.id,
        label=info.label,
        text=reply_text,
        ttft_ms=result.ttft_ms,
        tokens_per_s=result.tokens_per_s,
        completion_tokens=result.completion_tokens,
        words=len(reply_text.split()),
        error=result.error or error,
        total_ms=result.total_ms,
    )


def _one_after_another(
    group: Sequence[VariantInfo],
    streams: dict[int, TurnStream | str],
    replies: dict[int, VariantReply],
    cancel: threading.Event | None,
) -> Iterator[ReplyEvent]:
    for info in group:
        if cancel is not None and cancel.is_set():
            return
        reply = yield from _stream_one(info, streams[info.id], cancel)
        replies[info.id] = reply
        yield ReplyEvent(info.id, reply=reply)


_GROUP_DONE = object()


def _side_by_side(
    groups: Sequence[Sequence[VariantInfo]],
    streams: dict[int, TurnStream | str],
    replies: dict[int, VariantReply],
) -> Iterator[ReplyEvent]:
    """Run each group in a thread of its own and yield their events as they come.

    When the reader stops early, the groups stop reading at their next piece (storing those turns as
    interrupted) and are waited for, so every turn's end is stored when this generator is closed.
    """
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    cancel = threading.Event()

    def work(group: Sequence[VariantInfo]) -> None:
        steps = _one_after_another(group, streams, replies, cancel)
        try:
            for event in steps:
                events.put(event)
        except Exception:  # a bug here must not leave the reader waiting forever
            log.exception("A comparison group failed")
        finally:
            steps.close()
            events.put(_GROUP_DONE)

    threads = [
        threading.Thread(target=work, args=(group,), name=f"compare-{n}", daemon=True) for n, group in enumerate(groups)
    ]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            event = events.get()
            if event is _GROUP_DONE:
                running -= 1
            else:
                yield event  # type: ignore[misc]
    finally:
        cancel.set()
        for thread in threads:
            thread.join()


class ComparisonRun:
    """One caller turn sent to every variant of a comparison; iterate it for `ReplyEvent`s as the replies stream.

    Every variant's caller message is stored already (`stream_turn` did that), so the variants' turns stay aligned
    by index whatever happens next. Groups from `running_order` run side by side in threads; a comparison that is
    one group (its variants share a serial backend) runs in the reader's own thread, one column after another.
    Read it to the end, or leave it with `with` / `close()`: every turn not finished is then stored as interrupted.
    """

    def __init__(
        self,
        comparison_id: int,
        user_text: str,
        variants: list[VariantInfo],
        groups: list[list[VariantInfo]],
        streams: dict[int, TurnStream | str],
    ) -> None:
        self.comparison_id = comparison_id
        self.user_text = user_text
        self.variants = variants  # in column order
        self.groups = groups
        self._streams = streams
        self._replies: dict[int, VariantReply] = {}
        self._events: Iterator[ReplyEvent] | None = None

    @property
    def serial(self) -> bool:
        """Whether the variants run one after another (they share a serial backend), not at the same time."""
        return len(self.groups) == 1 and len(self.groups[0]) > 1

    @property
    def replies(self) -> list[VariantReply]:
        """Every variant's reply in column order; one not finished (the run was left early) says so."""
        return [self._replies.get(v.id) or _failed_reply(v, "the turn did not run to the end") for v in self.variants]

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self._events is None:
            if len(self.groups) == 1:
                self._events = _one_after_another(self.groups[0], self._streams, self._replies, None)
            else:
                self._events = _side_by_side(self.groups, self._streams, self._replies)
        return self._events

    def __next__(self) -> ReplyEvent:
        return next(iter(self))

    def close(self) -> None:
        """Stop: every turn not read to the end (or not started) is stored as interrupted. Harmless when done."""
        if self._events is not None:
            self._events.close()  # type: ignore[attr-defined]
        for stream in self._streams.values():
            if not isinstance(stream, str):
                stream.close()

    def __enter__(self) -> ComparisonRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the exception already on its way out says more
            log.exception("Storing the interrupted turns of comparison %s failed", self.comparison_id)


def stream_turn(service: ConversationService, comparison_id: int, text: object, *, actor: Actor) -> ComparisonRun:
    """Send the same caller text to every variant; iterate the returned run for the replies as they stream.

    The text is validated once, and every variant's conversation checked, before anything is stored; then each
    variant's caller message is stored (`ConversationService.send`), in column order. A variant whose turn cannot
    start gets its error as its reply. Variants on a serial backend run one after another, in column order (see
    `running_order`); the others run at the same time.
    """
    require(actor, "compare")
    user_text = clean_message(text, max_chars=service.settings.max_message_chars)
    with service.store.session() as session:
        _get(session, comparison_id)
        rows = _variants(session, comparison_id)
        jobs: list[_Job] = []
        for variant, conversation, version in rows:
            if conversation.status != "active":
                # Checked for all before sending to any, so the variants' turns stay aligned by index.
                raise Conflict(f"Variant {variant.label}'s conversation {conversation.id} has ended")
            info = _variant_info(variant, conversation, version)
            jobs.append(_Job(info, params_for(version, info.params)))
    if not jobs:
        raise Conflict(f"Comparison {comparison_id} has no variants")
    variants = [j.info for j in jobs]
    groups = running_order(service, variants)
    streams: dict[int, TurnStream | str] = {}
    try:
        for job in jobs:
            try:
                streams[job.info.id] = service.send(job.info.conversation_id, user_text, params=job.params, actor=actor)
            except CallbotError as exc:
                streams[job.info.id] = str(exc)
            except Exception as exc:  # as in `_stream_one`: one variant's bug is its own column's error
                streams[job.info.id] = f"{type(exc).__name__}: {exc}"
    except BaseException:
        for stream in streams.values():
            if not isinstance(stream, str):
                stream.close()
        raise
    return ComparisonRun(comparison_id, user_text, variants, groups, streams)


def send_turn(service: ConversationService, comparison_id: int, text: object, *, actor: Actor) -> list[VariantReply]:
    """Send the same user text to every variant and wait for every reply; replies come back in column order.

    As `stream_turn`, read to the end: remote backends run truly in parallel, variants on a serial backend (the
    embedded model) one after another, so each variant's TTFT is measured from its own start.
    """
    with stream_turn(service, comparison_id, text, actor=actor) as run:
        for _ in run:
            pass
        return run.replies


# -- votes --------------------------------------------------------------------------------------


def _turns_of(session: Session, conversation_id: int) -> list[int]:
    """The turn_metrics ids of a conversation in order: one row per turn, failed turns included."""
    return list(
        session.scalars(
            select(TurnMetrics.id).where(TurnMetrics.conversation_id == conversation_id).order_by(TurnMetrics.id)
        )
    )


# A comparison nobody said anything to in this long was left (a closed tab): its conversations are ended.
ABANDONED_AFTER = timedelta(hours=1)


def end_abandoned(store: Store, *, now: datetime | None = None) -> int:
    """End the conversations of comparisons started over `ABANDONED_AFTER` ago that never got a caller turn; returns
    how many were ended. Run when comparisons are listed or started, so none stays active for ever."""
    cutoff = (now or utcnow()) - ABANDONED_AFTER
    spoken = select(Message.conversation_id).where(Message.role == "user")
    with store.session() as session:
        idle = session.scalars(
            select(Conversation.id)
            .join(ComparisonVariant, ComparisonVariant.conversation_id == Conversation.id)
            .join(Comparison, Comparison.id == ComparisonVariant.comparison_id)
            .where(
                Conversation.status == "active",
                Comparison.created_at < cutoff,
                ~ComparisonVariant.comparison_id.in_(
                    select(ComparisonVariant.comparison_id).where(ComparisonVariant.conversation_id.in_(spoken))
                ),
            )
        ).all()
        return sum(mark_ended(session, cid) for cid in idle)


def end_comparison(store: Store, comparison_id: int, *, actor: Actor) -> int:
    """End every variant's conversation (a reply still streaming is stored as interrupted); returns how many were
    still active. A comparison left for a new one, with or without turns, must not stay active for ever."""
    require(actor, "compare")
    with store.session() as session:
        _get(session, comparison_id)
        ended = sum(mark_ended(session, conversation.id) for _, conversation, _ in _variants(session, comparison_id))
        if ended:
            audit.record(session, "comparison.end", actor=actor.username, target=str(comparison_id),
                         detail={"conversations_ended": ended})  # fmt: skip
    return ended


def vote(store: Store, comparison_id: int, turn_index: int, variant_id: int, *, actor: Actor) -> None:
    """Store `actor`'s preferred variant for one turn, replacing their earlier vote on that turn."""
    require(actor, "compare")
    voter_id = getattr(actor, "id", None)
    if isinstance(turn_index, bool) or not isinstance(turn_index, int):
        raise InvalidInput(f"A turn index must be a whole number, not {turn_index!r}")
    with store.session() as session:
        comparison = _get(session, comparison_id)
        variant = session.get(ComparisonVariant, variant_id) if isinstance(variant_id, int) else None
        if variant is None or variant.comparison_id != comparison.id:
            raise InvalidInput(f"Variant {variant_id!r} is not part of comparison {comparison_id}")
        turns = _turns_of(session, variant.conversation_id)
        if not 0 <= turn_index < len(turns):
            raise InvalidInput(f"Comparison {comparison_id} has no turn {turn_index} (it has {len(turns)})")
        failed = session.scalar(select(TurnMetrics.error).where(TurnMetrics.id == turns[turn_index]))
        if failed:
            raise InvalidInput(f"Variant {variant.label} has no reply at turn {turn_index}: it failed")
        query = select(ComparisonVote).where(
            ComparisonVote.comparison_id == comparison.id, ComparisonVote.turn_index == turn_index
        )
        query = query.where(
            ComparisonVote.voter_id.is_(None) if voter_id is None else ComparisonVote.voter_id == voter_id
        )
        existing = session.scalar(query)
        previous = None
        if existing is None:
            session.add(
                ComparisonVote(
                    comparison_id=comparison.id, turn_index=turn_index, variant_id=variant.id, voter_id=voter_id
                )
            )
        else:
            previous = existing.variant_id
            existing.variant_id = variant.id
            existing.created_at = utcnow()
        audit.record(
            session,
            "comparison.vote",
            actor=actor.username,
            target=f"comparison#{comparison.id}",
            detail={"turn": turn_index, "variant": variant.label, "replaced": previous is not None},
        )


# -- reading ------------------------------------------------------------------------------------


def get_comparison(store: Store, comparison_id: int) -> ComparisonDetail:
    """The comparison with its variants, its turns aligned by index across variants, and its votes."""
    user_msg, bot_msg = aliased(Message), aliased(Message)
    with store.session() as session:
        comparison = _get(session, comparison_id)
        rows = _variants(session, comparison.id)
        votes = [
            VoteInfo(v.turn_index, v.variant_id, v.voter_id, v.created_at)
            for v in session.scalars(
                select(ComparisonVote)
                .where(ComparisonVote.comparison_id == comparison.id)
                .order_by(ComparisonVote.turn_index, ComparisonVote.id)
            )
        ]
        counts: dict[int, int] = {}
        for v in votes:
            counts[v.variant_id] = counts.get(v.variant_id, 0) + 1
        variants: list[VariantInfo] = []
        per_variant: list[list[tuple[str, VariantReply]]] = []
        for variant, conversation, version in rows:
            info = _variant_info(variant, conversation, version)
            variants.append(replace(info, votes=counts.get(info.id, 0)))
            turns = session.execute(
                select(TurnMetrics, user_msg.text, bot_msg.text)
                .join(user_msg, user_msg.id == TurnMetrics.user_message_id)
                .outerjoin(bot_msg, bot_msg.id == TurnMetrics.assistant_message_id)
                .where(TurnMetrics.conversation_id == conversation.id)
                .order_by(TurnMetrics.id)
            )
            replies = []
            for metrics, asked, answered in turns:
                answer = answered or ""
                replies.append(
                    (
                        asked,
                        VariantReply(
                            variant_id=info.id,
                            label=info.label,
                            text=answer,
                            ttft_ms=metrics.ttft_ms,
                            tokens_per_s=metrics.tokens_per_s,
                            completion_tokens=metrics.completion_tokens,
                            words=len(answer.split()),
                            error=metrics.error,
                            total_ms=metrics.total_ms,
                        ),
                    )
                )
            per_variant.append(replies)
        n_turns = max((len(r) for r in per_variant), default=0)
        aligned = []
        for index in range(n_turns):
            cells = [r[index] if index < len(r) else None for r in per_variant]
            asked = next((c[0] for c in cells if c is not None), "")
            aligned.append(ComparisonTurn(index, asked, [c[1] if c is not None else None for c in cells]))
        return ComparisonDetail(
            id=comparison.id,
            title=comparison.title,
            blind=comparison.blind,
            created_at=comparison.created_at,
            created_by=comparison.created_by,
            variants=variants,
            turns=aligned,
            votes=votes,
        )


def list_comparisons(store: Store, limit: int = 50, *, created_by: int | None = None) -> list[ComparisonRow]:
    """The newest comparisons first, optionally only one user's."""
    end_abandoned(store)
    n_variants = (
        select(ComparisonVariant.comparison_id.label("cid"), func.count().label("n"))
        .group_by(ComparisonVariant.comparison_id)
        .subquery()
    )
    n_votes = (
        select(ComparisonVote.comparison_id.label("cid"), func.count().label("n"))
        .group_by(ComparisonVote.comparison_id)
        .subquery()
    )
    query = (
        select(Comparison, n_variants.c.n, n_votes.c.n)
        .outerjoin(n_variants, n_variants.c.cid == Comparison.id)
        .outerjoin(n_votes, n_votes.c.cid == Comparison.id)
        .order_by(Comparison.id.desc())
        .limit(max(1, int(limit)))
    )
    if created_by is not None:
        query = query.where(Comparison.created_by == created_by)
    with store.session() as session:
        return [
            ComparisonRow(c.id, c.title, c.blind, c.created_at, variants or 0, votes or 0)
            for c, variants, votes in session.execute(query)
        ]


def vote_tally(store: Store, comparison_id: int) -> dict[str, int]:
    """Votes per variant label (every label present), e.g. {"A": 2, "B": 1}."""
    detail = get_comparison(store, comparison_id)
    return {v.label: v.votes for v in detail.variants}
