"""Who may do what: one table of actions and the roles allowed them, asked by every engine function that changes or
reveals data (datasette's `allowed(action, actor)`: identity is separate from permission).

The app hides what a role cannot use, but the rule is checked here, below every front end, so the CLI, the app and
the HTTP API always agree. An actor is anything with a `username` and a `role`: a signed-in user (`UserInfo`), an
API key's user, or `LOCAL_OPERATOR` for the command line run by whoever owns the store's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from callbot_core.errors import PermissionDenied

ADMIN, RESEARCHER, VIEWER = "admin", "researcher", "viewer"
EVERYONE = frozenset({ADMIN, RESEARCHER, VIEWER})
RESEARCH = frozenset({ADMIN, RESEARCHER})
ADMINS = frozenset({ADMIN})


# An API key carries scopes that narrow what its user's role allows (never widen it): each action needs one.
CHAT, READ, ADMIN_SCOPE = "chat", "read", "admin"
SCOPES = (CHAT, READ, ADMIN_SCOPE)


@dataclass(frozen=True, slots=True)
class Action:
    roles: frozenset[str]
    # Completes "… may not …" in the refusal, so the one-line error says what was refused.
    doing: str
    # The API key scope this action needs (a person signed in with a password holds every scope).
    scope: str = READ


# The one table. Add an action here, then call `require(actor, "name")` in the engine function it guards.
ACTIONS: dict[str, Action] = {
    "chat": Action(RESEARCH, "chat with personas", CHAT),
    "persona.edit": Action(RESEARCH, "create, edit, clone, import or archive personas", CHAT),
    "persona.promote": Action(RESEARCH, "move a persona's production label", CHAT),
    "compare": Action(RESEARCH, "compare persona versions or vote on them", CHAT),
    "suite.run": Action(RESEARCH, "run scenario suites", CHAT),
    "conversation.read": Action(EVERYONE, "read conversations", READ),
    "conversation.delete": Action(ADMINS, "delete conversations", ADMIN_SCOPE),
    "report.run": Action(RESEARCH, "run reports", CHAT),
    "report.other_database": Action(ADMINS, "point a report at another database", ADMIN_SCOPE),
    "sql.run": Action(EVERYONE, "run SQL over the store", READ),
    "query.save": Action(EVERYONE, "save, share or delete their own saved queries", READ),
    "query.delete_others": Action(ADMINS, "delete other users' saved queries", ADMIN_SCOPE),
    "user.manage": Action(ADMINS, "manage users", ADMIN_SCOPE),
    "apikey.manage": Action(ADMINS, "create, list or revoke API keys", ADMIN_SCOPE),
    "audit.read": Action(ADMINS, "read the audit log", ADMIN_SCOPE),
    "metrics.read": Action(EVERYONE, "read the service's metrics", READ),
    "knowledge.read": Action(EVERYONE, "search knowledge collections or list their documents", READ),
    "knowledge.edit": Action(RESEARCH, "ingest or delete knowledge documents", CHAT),
    "knowledge.eval": Action(RESEARCH, "run retrieval evaluations", CHAT),
}


class Actor(Protocol):
    """Whoever acts: only the username (for the audit log) and the role (for this table) matter here."""

    @property
    def username(self) -> str: ...

    @property
    def role(self) -> str: ...


@dataclass(frozen=True, slots=True)
class OperatorActor:
    """Someone acting outside any sign-in: the command line, a scheduled job, a migration."""

    username: str
    role: str
    id: int | None = None


# The command line acts with the store's own credentials: whoever can run it can already read and write the files.
LOCAL_OPERATOR = OperatorActor(username="cli", role=ADMIN)
# Scheduled pipelines run as the system: their schedule file is the operator's own configuration.
SCHEDULER = OperatorActor(username="scheduler", role=ADMIN)


def pipeline_actor(job: str) -> OperatorActor:
    """The scheduler acting for one job, named after it ("pipeline:weekly") so its runs say which job made them."""
    return OperatorActor(username=f"pipeline:{job}", role=SCHEDULER.role)


def _scopes(actor: Actor) -> frozenset[str] | None:
    """The API key scopes an actor is limited to; None (every scope) for anyone not acting through a key."""
    return getattr(actor, "scopes", None)


def allowed(actor: Actor | None, action: str) -> bool:
    """Whether `actor` may do `action`: its role allows it and, acting through an API key, the key's scopes hold
    the action's scope. An unknown action is a programming error, not a refusal."""
    try:
        rule = ACTIONS[action]
    except KeyError:
        raise ValueError(f"Unknown action {action!r}: add it to ACTIONS in access/permissions.py") from None
    if actor is None or actor.role not in rule.roles:
        return False
    scopes = _scopes(actor)
    return scopes is None or rule.scope in scopes


def require(actor: Actor | None, action: str) -> None:
    """Raise `PermissionDenied` (one line naming who, the role and what) unless `actor` may do `action`."""
    if allowed(actor, action):
        return
    rule = ACTIONS[action]
    if actor is None:
        raise PermissionDenied(f"Sign in first: only a signed-in user may {rule.doing}", action=action, role="")
    scopes = _scopes(actor)
    if actor.role in rule.roles and scopes is not None:
        raise PermissionDenied(
            f"This API key of {actor.username} may not {rule.doing}: it needs the {rule.scope!r} scope"
            f" (the key has: {', '.join(sorted(scopes)) or 'none'})",
            action=action,
            role=actor.role,
        )
    raise PermissionDenied(
        f"{actor.username} ({actor.role}) may not {rule.doing}; allowed roles: {', '.join(sorted(rule.roles))}",
        action=action,
        role=actor.role,
    )


def require_owner(actor: Actor, owner_id: int | None, what: str) -> None:
    """Raise `PermissionDenied` unless `actor` may change `what` (a conversation: send a turn, end or summarise it),
    which the user `owner_id` started: only that user or an admin may (the command line and scheduled jobs act as
    admins; a conversation started by no stored user is for actors with no stored user). Checked after `require`,
    which holds the role and the key's scope; reading is for everyone."""
    # An operator without a stored user (a job, a test) started its conversations with no owner, and may go on.
    if actor.role == ADMIN or getattr(actor, "id", None) == owner_id:
        return
    raise PermissionDenied(
        f"{actor.username} ({actor.role}) may not change {what}: only the user who started it or an admin may",
        action="chat",
        role=actor.role,
    )
