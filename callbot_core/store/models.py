"""The SQL store's tables, as SQLAlchemy 2 models. Alembic migrations in `migrations/` mirror them.

Types are chosen to mean the same on SQLite and PostgreSQL: timezone-aware timestamps, plain strings
with CHECK constraints instead of native enums (a native enum would need extra migrations on PostgreSQL
to grow, and does not exist on SQLite).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from callbot_core.store.types import UTCDateTime

ROLES = ("admin", "researcher", "viewer")
CHANNELS = ("text", "voice", "api", "simulated")
CONVERSATION_STATUSES = ("active", "ended")
MESSAGE_ROLES = ("system", "user", "assistant")

# Named constraints so migrations can refer to them the same way on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str | None] = mapped_column(String(320))
    password_hash: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(20), default="researcher")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class UserSession(Base):
    """One browser sign-in. The cookie carries a random token; only its SHA-256 hex digest is stored, so a
    leaked copy of this table signs nobody in. A session is valid while it exists, is not revoked and has
    not expired (`callbot_core.access.sessions`)."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # CASCADE: deleting a user ends their sessions in the database itself.
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    client_addr: Mapped[str | None] = mapped_column(String(64))


API_SCOPES = ("chat", "read", "admin")


class ApiKey(Base):
    """A key a program uses instead of a password (`callbot_core.access.apikeys`). Only the SHA-256 digest of the
    key is stored; `prefix` (its first characters) lets a person tell their keys apart in a list. A key acts as its
    user, narrowed to its scopes; it is refused once revoked, expired, or its user is gone or locked by an admin."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(100))  # comma-separated, from API_SCOPES
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Persona(Base):
    __tablename__ = "personas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    # The label lives on the persona, not on a version: moving it must not touch a used (frozen) version.
    # use_alter breaks the personas <-> persona_versions cycle for CREATE/DROP order; SET NULL lets a
    # version row be deleted without first clearing the label.
    production_version_id: Mapped[int | None] = mapped_column(
        ForeignKey(
            "persona_versions.id",
            ondelete="SET NULL",
            use_alter=True,
            name="fk_personas_production_version_id_persona_versions",
        )
    )

    versions: Mapped[list[PersonaVersion]] = relationship(
        back_populates="persona", order_by="PersonaVersion.version", foreign_keys="PersonaVersion.persona_id"
    )


class PersonaVersion(Base):
    """One immutable-once-used configuration of a persona (see `store.guards`)."""

    __tablename__ = "persona_versions"
    __table_args__ = (
        UniqueConstraint("persona_id", "version", name="uq_persona_versions_persona_version"),
        CheckConstraint("temperature >= 0 AND temperature <= 2", name="temperature"),
        CheckConstraint("top_p > 0 AND top_p <= 1", name="top_p"),
        CheckConstraint("max_tokens > 0", name="max_tokens"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    system_prompt: Mapped[str] = mapped_column(Text)
    greeting: Mapped[str] = mapped_column(Text, default="")
    temperature: Mapped[float] = mapped_column(Float, default=0.7)
    top_p: Mapped[float] = mapped_column(Float, default=0.95)
    max_tokens: Mapped[int] = mapped_column(Integer, default=256)
    # None means "the configured default", so a persona follows CALLBOT_LLM_BACKEND unless pinned.
    backend: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(200))
    voice: Mapped[str | None] = mapped_column(String(100))
    # Server defaults so rows written before migration 0003 read as "none" rather than NULL.
    stop_words: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    tags: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")
    # Character Card extension keys other than `callbot`, kept verbatim so an import/export round trip loses nothing.
    card_extensions: Mapped[dict] = mapped_column(JSON, default=dict, server_default="{}")
    # Card fields we keep for export but do not use directly (personality, scenario, mes_example...).
    card_fields: Mapped[dict] = mapped_column(JSON, default=dict, server_default="{}")
    note: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Retrieval: the knowledge collection the persona answers from (None: no retrieval), how many passages a turn
    # gets, and the similarity under which a retrieval is flagged low relevance (None: the configured default).
    # Part of the version, so retrieval settings are compared, frozen and promoted like the prompt.
    knowledge_collection: Mapped[str | None] = mapped_column(String(64))
    knowledge_k: Mapped[int] = mapped_column(Integer, default=4, server_default="4")
    knowledge_threshold: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    persona: Mapped[Persona] = relationship(back_populates="versions", foreign_keys=[persona_id])


class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        CheckConstraint(_in("channel", CHANNELS), name="channel"),
        CheckConstraint(_in("status", CONVERSATION_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # NULL user: started from the command line without signing in.
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    persona_version_id: Mapped[int] = mapped_column(ForeignKey("persona_versions.id"), index=True)
    backend: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(20), default="text")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20), default="active")
    summary_short: Mapped[str | None] = mapped_column(Text)
    summary_full: Mapped[str | None] = mapped_column(Text)
    # The prompt variables as resolved at start ({{today}} included): every turn renders the system prompt
    # with these, so a conversation keeps its prompt across restarts, processes and midnight.
    variables: Mapped[dict | None] = mapped_column(JSON)
    # The API key that started it, when a program did (the HTTP API): which key made which calls.
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"), index=True)

    persona_version: Mapped[PersonaVersion] = relationship()
    user: Mapped[User | None] = relationship()
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        order_by="Message.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(_in("role", MESSAGE_ROLES), name="role"),
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    token_count: Mapped[int | None] = mapped_column(Integer)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class TurnMetrics(Base):
    """One row per turn, written once when the turn ends (`RunningTurn` marks it until then). A failed or interrupted
    turn has `error` set and no assistant message."""

    __tablename__ = "turn_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    user_message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    assistant_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    backend: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    backend_prompt_eval_ms: Mapped[float | None] = mapped_column(Float)
    backend_eval_ms: Mapped[float | None] = mapped_column(Float)
    backend_load_ms: Mapped[float | None] = mapped_column(Float)
    backend_total_ms: Mapped[float | None] = mapped_column(Float)
    # How many history messages were dropped to fit the context window: trimming is visible, not silent.
    trimmed_messages: Mapped[int] = mapped_column(Integer, default=0)
    # The reply came from the response cache (a seeded, deterministic request seen before), not the backend.
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RunningTurn(Base):
    """A turn whose caller's message is stored and whose end is not yet: the row goes when the end is written.

    The caller's message is stored when the turn starts, with this row naming the process ("host:pid") that runs
    it; the reply, `turn_metrics` and `turn_stages` are written when it ends, and this row is deleted in the same
    transaction. A process killed mid-reply leaves its row behind, and `reconcile_turns` ends such turns as
    interrupted. Kept apart from `turn_metrics` so that rows there are written once, whole: the analytics snapshot
    copies them as append-only.
    """

    __tablename__ = "running_turns"

    user_message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    backend: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    worker: Mapped[str] = mapped_column(String(160))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TurnStage(Base):
    """One stage of a turn (validate, prompt, generate, persist...) as its one clock timed it.

    Hangs off the turn's `turn_metrics` row, so deleting a conversation removes its stages with its turns. Only
    stages that ran have a row: after a failure, stages that record nothing are skipped; the failing stage's row
    carries the error.
    """

    __tablename__ = "turn_stages"
    __table_args__ = (UniqueConstraint("turn_metrics_id", "position", name="uq_turn_stages_turn_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No index of its own: the unique (turn_metrics_id, position) index serves lookups and the cascade.
    turn_metrics_id: Mapped[int] = mapped_column(ForeignKey("turn_metrics.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(40))
    # The stage's place in the turn's stage list (0 = first), so rows read in the order the stages ran.
    position: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The stage's first output (for generate: the first token); NULL for stages that produce none.
    first_output_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(200))
    detail: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    client_addr: Mapped[str | None] = mapped_column(String(64))


REPORT_STATUSES = ("queued", "running", "succeeded", "failed")


class SavedQuery(Base):
    """A named SQL query a user keeps on the Analytics page; `shared` lets every user see and run it."""

    __tablename__ = "saved_queries"
    __table_args__ = (UniqueConstraint("owner_id", "name", name="uq_saved_queries_owner_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(Text, default="")
    sql: Mapped[str] = mapped_column(Text)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ReportRun(Base):
    """One execution of a report notebook (by a user, the CLI or the scheduler)."""

    __tablename__ = "report_runs"
    __table_args__ = (CheckConstraint(_in("status", REPORT_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), index=True)
    parameters: Mapped[dict | None] = mapped_column(JSON)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20), default="queued")
    # "host:pid" of the process running it, so a run whose process died can be told from one still going.
    worker: Mapped[str | None] = mapped_column(String(160))
    output_html: Mapped[str | None] = mapped_column(Text)
    output_notebook: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class PipelineRun(Base):
    """A scheduled job's claim on one due time. The unique (job, due_at) pair is what makes two
    overlapping `run-due` calls unable to run the same job twice: the second insert fails."""

    __tablename__ = "pipeline_runs"
    __table_args__ = (
        UniqueConstraint("job", "due_at", name="uq_pipeline_runs_job_due_at"),
        CheckConstraint(_in("status", REPORT_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(120))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20), default="running")
    # "host:pid" of the process running it, so a run whose process died can be told from one still going.
    worker: Mapped[str | None] = mapped_column(String(160))
    report_run_id: Mapped[int | None] = mapped_column(ForeignKey("report_runs.id", ondelete="SET NULL"))
    error: Mapped[str | None] = mapped_column(Text)


class SystemMetrics(Base):
    """A snapshot of the machine and this process, taken by a pipeline (psutil)."""

    __tablename__ = "system_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    host: Mapped[str] = mapped_column(String(200))
    cpu_percent: Mapped[float] = mapped_column(Float)
    memory_percent: Mapped[float] = mapped_column(Float)
    memory_used_mb: Mapped[float] = mapped_column(Float)
    disk_percent: Mapped[float] = mapped_column(Float)
    process_rss_mb: Mapped[float] = mapped_column(Float)


class Comparison(Base):
    """The same caller turns sent to 2-4 persona versions or parameter variants side by side."""

    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Blind: the page hides which variant is which until the user has voted on a turn.
    blind: Mapped[bool] = mapped_column(Boolean, default=False)


class ComparisonVariant(Base):
    """One column of a comparison: its own stored conversation, with optional parameter overrides."""

    __tablename__ = "comparison_variants"
    __table_args__ = (
        UniqueConstraint("comparison_id", "position", name="uq_comparison_variants_position"),
        UniqueConstraint("comparison_id", "setup_position", name="uq_comparison_variants_setup_position"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), index=True)
    # The column it is shown in (label A is position 0). A blind comparison shuffles the variants once, when it
    # starts, so Variant A is not always the first one set up; `setup_position` keeps the order they were given in.
    # A variant stored without one was not shuffled: it was set up where it is shown.
    position: Mapped[int] = mapped_column(Integer)
    setup_position: Mapped[int] = mapped_column(
        Integer, default=lambda context: context.get_current_parameters()["position"]
    )
    label: Mapped[str] = mapped_column(String(40))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), unique=True)
    params: Mapped[dict | None] = mapped_column(JSON)


class ComparisonVote(Base):
    """Which variant's reply a user preferred at one turn of a comparison."""

    __tablename__ = "comparison_votes"
    __table_args__ = (
        UniqueConstraint("comparison_id", "turn_index", "voter_id", name="uq_comparison_votes_turn_voter"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), index=True)
    turn_index: Mapped[int] = mapped_column(Integer)
    variant_id: Mapped[int] = mapped_column(ForeignKey("comparison_variants.id", ondelete="CASCADE"))
    voter_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


EVAL_STATUSES = ("running", "passed", "failed", "error")


class EvalRun(Base):
    """One run of a scenario suite against one persona version and parameter set (one grid cell, one repeat)."""

    __tablename__ = "eval_runs"
    __table_args__ = (CheckConstraint(_in("status", EVAL_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch: Mapped[str] = mapped_column(String(64), index=True)  # groups the cells of one `callbot eval run`
    suite: Mapped[str] = mapped_column(String(200))
    persona_version_id: Mapped[int] = mapped_column(ForeignKey("persona_versions.id"), index=True)
    params: Mapped[dict | None] = mapped_column(JSON)
    repeat_index: Mapped[int] = mapped_column(Integer, default=0)
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"))
    created_by: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20), default="running")
    # "host:pid" of the process running it, so a run whose process died can be told from one still going.
    worker: Mapped[str | None] = mapped_column(String(160))
    error: Mapped[str | None] = mapped_column(Text)


class EvalResult(Base):
    """One assertion's outcome on one turn of an eval run."""

    __tablename__ = "eval_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    eval_run_id: Mapped[int] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    turn_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(40))
    spec: Mapped[dict | None] = mapped_column(JSON)
    passed: Mapped[bool] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text, default="")


# -- knowledge ------------------------------------------------------------------------------------------------


class KnowledgeCollection(Base):
    """A named set of documents searched together. It records which embedder made its vectors (name and
    dimensions): a query embedded by another one would compare meaningless numbers, so that is refused."""

    __tablename__ = "knowledge_collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    embedder: Mapped[str] = mapped_column(String(100))
    dimensions: Mapped[int] = mapped_column(Integer)
    # The vector store's name for it: the name plus a random suffix, so a store rebuilt from scratch never meets
    # vectors left in the vector store by an earlier one (their ids would name other chunks).
    vector_name: Mapped[str] = mapped_column(String(64), unique=True)
    # Bumped by every change to its chunks: the in-memory keyword index is rebuilt when it moves.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))


class KnowledgeDocument(Base):
    """One ingested file. `source` is its name (its path under the folder ingested, for folders); re-ingesting the
    same source replaces its chunks, unless the bytes and chunk settings are unchanged (then it is skipped)."""

    __tablename__ = "knowledge_documents"
    __table_args__ = (UniqueConstraint("collection_id", "source", name="uq_knowledge_documents_collection_source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("knowledge_collections.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(500))
    format: Mapped[str] = mapped_column(String(10))
    content_hash: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    pages: Mapped[int | None] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    chunk_overlap: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    ingested_by: Mapped[str | None] = mapped_column(String(64))


class KnowledgeChunk(Base):
    """A passage of a document: its text and where it came from. Its vector lives in the vector store under the
    chunk's id; `content_hash` keys the embedding cache."""

    __tablename__ = "knowledge_chunks"
    __table_args__ = (Index("ix_knowledge_chunks_document_id_position", "document_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("knowledge_documents.id", ondelete="CASCADE"))
    # Denormalised from the document: the keyword index loads a collection's chunks in one query.
    collection_id: Mapped[int] = mapped_column(ForeignKey("knowledge_collections.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer)
    heading: Mapped[str | None] = mapped_column(String(500))
    content_hash: Mapped[str] = mapped_column(String(64))


class EmbeddingCache(Base):
    """Vectors by embedder and text hash: re-ingesting a changed file embeds only the passages that changed."""

    __tablename__ = "embedding_cache"

    embedder: Mapped[str] = mapped_column(String(100), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian


class TurnRetrieval(Base):
    """One passage a turn retrieved, in rank order. Source, page and heading are copied: a document re-ingested
    later replaces its chunks, and the turn must still say what it was shown."""

    __tablename__ = "turn_retrievals"
    __table_args__ = (UniqueConstraint("turn_metrics_id", "rank", name="uq_turn_retrievals_turn_rank"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_metrics_id: Mapped[int] = mapped_column(ForeignKey("turn_metrics.id", ondelete="CASCADE"))
    chunk_id: Mapped[int | None] = mapped_column(ForeignKey("knowledge_chunks.id", ondelete="SET NULL"), index=True)
    collection: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(500))
    page: Mapped[int | None] = mapped_column(Integer)
    heading: Mapped[str | None] = mapped_column(String(500))
    rank: Mapped[int] = mapped_column(Integer)  # 1 = best, after fusing keyword and vector ranks
    similarity: Mapped[float | None] = mapped_column(Float)  # cosine similarity 0..1; None: a keyword-only hit
    low_relevance: Mapped[bool] = mapped_column(Boolean, default=False)  # the turn's flag, on each of its rows


class RetrievalEval(Base):
    """One run of a question set against a collection with given settings: recall@k, MRR, and how many questions
    the documents do not answer were flagged low relevance."""

    __tablename__ = "retrieval_evals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection: Mapped[str] = mapped_column(String(64), index=True)
    questions_file: Mapped[str] = mapped_column(String(500))
    k: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    embedder: Mapped[str] = mapped_column(String(100))
    # The collection's chunk settings when it ran (its documents' most common ones), so runs compare like for like.
    chunk_size: Mapped[int | None] = mapped_column(Integer)
    chunk_overlap: Mapped[int | None] = mapped_column(Integer)
    questions: Mapped[int] = mapped_column(Integer)
    answerable: Mapped[int] = mapped_column(Integer)
    recall_at_k: Mapped[float | None] = mapped_column(Float)  # None when no question is answerable
    mrr: Mapped[float | None] = mapped_column(Float)
    unanswerable_flagged: Mapped[int] = mapped_column(Integer)
    unanswerable: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64))


class RetrievalEvalResult(Base):
    """One question of a retrieval evaluation: what was expected, what came back, where the first right one was."""

    __tablename__ = "retrieval_eval_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    retrieval_eval_id: Mapped[int] = mapped_column(ForeignKey("retrieval_evals.id", ondelete="CASCADE"), index=True)
    question: Mapped[str] = mapped_column(Text)
    expected_sources: Mapped[list] = mapped_column(JSON)
    retrieved_sources: Mapped[list] = mapped_column(JSON)
    first_relevant_rank: Mapped[int | None] = mapped_column(Integer)
    best_similarity: Mapped[float | None] = mapped_column(Float)
    low_relevance: Mapped[bool] = mapped_column(Boolean)
