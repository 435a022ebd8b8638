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


@dataclass(frozen=True, slots=True)
class Action:
    roles: frozenset[str]
    # Completes "… may not …" in the refusal, so the one-line error says what was refused.
    doing: str


# The one table. Add an action here, then call `require(actor, "name")` in the engine function it guards.
ACTIONS: dict[str, Action] = {
    "chat": Action(RESEARCH, "chat with personas"),
    "persona.edit": Action(RESEARCH, "create, edit, clone, import or archive personas"),
    "persona.promote": Action(RESEARCH, "move a persona's production label"),
    "compare": Action(RESEARCH, "compare persona versions or vote on them"),
    "suite.run": Action(RESEARCH, "run scenario suites"),
    "conversation.read": Action(EVERYONE, "read conversations"),
    "conversation.delete": Action(ADMINS, "delete conversations"),
    "report.run": Action(RESEARCH, "run reports"),
    "report.other_database": Action(ADMINS, "point a report at another database"),
    "sql.run": Action(EVERYONE, "run SQL over the store"),
    "query.save": Action(EVERYONE, "save, share or delete their own saved queries"),
    "query.delete_others": Action(ADMINS, "delete other users' saved queries"),
    "user.manage": Action(ADMINS, "manage users"),
    "audit.read": Action(ADMINS, "read the audit log"),
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


def allowed(actor: Actor | None, action: str) -> bool:
    """Whether `actor` may do `action`; an unknown action is a programming error, not a refusal."""
    try:
        rule = ACTIONS[action]
    except KeyError:
        raise ValueError(f"Unknown action {action!r}: add it to ACTIONS in access/permissions.py") from None
    return actor is not None and actor.role in rule.roles


def require(actor: Actor | None, action: str) -> None:
    """Raise `PermissionDenied` (one line naming who, the role and what) unless `actor` may do `action`."""
    if allowed(actor, action):
        return
    rule = ACTIONS[action]
    if actor is None:
        raise PermissionDenied(f"Sign in first: only a signed-in user may {rule.doing}", action=action, role="")
    raise PermissionDenied(
        f"{actor.username} ({actor.role}) may not {rule.doing}; allowed roles: {', '.join(sorted(rule.roles))}",
        action=action,
        role=actor.role,
    )
