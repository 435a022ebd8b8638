"""Permissions live in the engine: the actions table itself, then every guarded engine function called as a viewer,
a researcher and an admin (refused with `PermissionDenied` and nothing stored, or allowed), then the CLI's `--as`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from callbot_core.access import audit
from callbot_core.access.permissions import (
    ACTIONS,
    LOCAL_OPERATOR,
    SCHEDULER,
    SCOPES,
    OperatorActor,
    allowed,
    pipeline_actor,
    require,
)
from callbot_core.access.signin import UserInfo, create_user, reset_password, set_role, unlock
from callbot_core.analytics import Analytics
from callbot_core.analytics.saved import delete_query, list_queries, save_query
from callbot_core.conversations.transcripts import delete_conversation
from callbot_core.errors import CallbotError, ConfigError, NotFound, PermissionDenied
from callbot_core.jobs import reports
from callbot_core.personas.cards import import_card
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.versions import (
    archive_persona,
    clone_persona,
    create_persona,
    save_version,
    set_production,
)
from callbot_core.store import Store
from callbot_core.store.models import ROLES, Conversation, User

PW = "long-enough-1"

# What each role may do, written out by hand: the table must say exactly this.
EXPECTED = {
    "viewer": {"conversation.read", "sql.run", "query.save", "metrics.read", "knowledge.read"},
    "researcher": {
        "chat", "persona.edit", "persona.promote", "compare", "suite.run", "conversation.read", "report.run",
        "sql.run", "query.save", "metrics.read", "knowledge.read", "knowledge.edit", "knowledge.eval",
    },
    "admin": set(ACTIONS),
}  # fmt: skip


# -- the table ---------------------------------------------------------------------------------------


def test_every_action_names_known_roles_and_says_what_it_is() -> None:
    for name, action in ACTIONS.items():
        assert action.roles and action.roles <= set(ROLES), name
        assert action.doing and "\n" not in action.doing, name


@pytest.mark.parametrize("role", ROLES)
def test_each_role_may_do_exactly_its_actions(role: str) -> None:
    actor = OperatorActor(username="someone", role=role)
    assert {name for name in ACTIONS if allowed(actor, name)} == EXPECTED[role]


@dataclass(frozen=True)
class _KeyActor:
    username: str
    role: str
    scopes: frozenset[str]


# What each API key scope allows on top of the role, written out by hand.
SCOPED = {
    "read": {"conversation.read", "sql.run", "query.save", "metrics.read", "knowledge.read"},
    "chat": {
        "chat",
        "persona.edit",
        "persona.promote",
        "compare",
        "suite.run",
        "report.run",
        "knowledge.edit",
        "knowledge.eval",
    },
}


@pytest.mark.parametrize("role", ROLES)
def test_a_key_s_scopes_narrow_its_role_and_never_widen_it(role: str) -> None:
    for scopes in (frozenset({"read"}), frozenset({"chat"}), frozenset({"chat", "read"}), frozenset()):
        actor = _KeyActor("someone", role, scopes)
        widest = set().union(*(SCOPED.get(s, set()) for s in scopes))
        assert {name for name in ACTIONS if allowed(actor, name)} == EXPECTED[role] & widest, (role, scopes)
    full = _KeyActor("someone", role, frozenset(SCOPES))
    assert {name for name in ACTIONS if allowed(full, name)} == EXPECTED[role]
    with (
        pytest.raises(PermissionDenied, match="needs the 'chat' scope")
        if role != "viewer"
        else pytest.raises(PermissionDenied, match="may not chat")
    ):
        require(_KeyActor("someone", role, frozenset({"read"})), "chat")


def test_viewers_read_and_run_sql_but_do_not_chat_or_change_anything() -> None:
    vera = OperatorActor(username="vera", role="viewer")
    assert allowed(vera, "conversation.read") and allowed(vera, "sql.run")
    for action in ("chat", "persona.edit", "persona.promote", "report.run", "conversation.delete", "user.manage"):
        assert not allowed(vera, action), action


def test_researchers_do_not_manage_users_delete_conversations_or_read_the_audit_log() -> None:
    rita = OperatorActor(username="rita", role="researcher")
    assert allowed(rita, "chat") and allowed(rita, "persona.promote") and allowed(rita, "report.run")
    for action in ("user.manage", "conversation.delete", "audit.read", "report.other_database", "query.delete_others"):
        assert not allowed(rita, action), action


def test_operators_are_admins() -> None:
    assert LOCAL_OPERATOR.role == SCHEDULER.role == "admin"
    job = pipeline_actor("weekly")
    assert job.username == "pipeline:weekly" and allowed(job, "report.other_database")


def test_a_refusal_is_one_line_naming_who_the_role_and_what() -> None:
    with pytest.raises(PermissionDenied) as info:
        require(OperatorActor(username="vera", role="viewer"), "persona.promote")
    message = str(info.value)
    assert message == "vera (viewer) may not move a persona's production label; allowed roles: admin, researcher"
    assert info.value.action == "persona.promote" and info.value.role == "viewer"
    assert isinstance(info.value, CallbotError)  # so every front end shows it as one line
    with pytest.raises(PermissionDenied, match="Sign in first"):
        require(None, "sql.run")


def test_an_unknown_action_is_a_programming_error_not_a_refusal() -> None:
    with pytest.raises(ValueError, match="Unknown action 'persona.eddit'"):
        allowed(LOCAL_OPERATOR, "persona.eddit")


def test_user_shorthands_follow_the_table() -> None:
    def user(role: str) -> UserInfo:
        return UserInfo(id=1, username="u", display_name="U", email=None, role=role)

    assert [user(r).can_chat for r in ROLES] == [allowed(user(r), "chat") for r in ROLES] == [True, True, False]
    assert [user(r).is_admin for r in ROLES] == [True, False, False]


# -- engine functions --------------------------------------------------------------------------------

TABLES = ("users", "personas", "persona_versions", "conversations", "messages", "audit_log", "saved_queries",
          "report_runs")  # fmt: skip


def _snapshot(store: Store) -> dict[str, list[tuple]]:
    """Every row of the tables a guarded function could change, to compare before and after a refusal."""
    with store.engine.connect() as conn:
        return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES}


@pytest.fixture
def people(store: Store) -> dict[str, UserInfo]:
    return {
        role: create_user(store, name, PW, role=role, actor=LOCAL_OPERATOR)
        for name, role in (("ada", "admin"), ("rita", "researcher"), ("vera", "viewer"))
    }


def _refused(store: Store, call: Callable[[], Any], action: str) -> None:
    before = _snapshot(store)
    with pytest.raises(PermissionDenied) as info:
        call()
    assert info.value.action == action
    assert _snapshot(store) == before  # nothing stored, changed or audited


def _card() -> str:
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0",
                       "data": {"name": "Concierge", "system_prompt": "You are a hotel concierge."}})  # fmt: skip


PERSONA_EDITS: dict[str, Callable[[Store, Any], Any]] = {
    "create": lambda s, a: create_persona(s, "bank", "Bank", system_prompt="You work at a bank.", actor=a),
    "edit": lambda s, a: save_version(s, "tutor", {"temperature": 0.3}, actor=a),
    "clone": lambda s, a: clone_persona(s, "tutor@1", "tutor-b", "Tutor B", actor=a),
    "archive": lambda s, a: archive_persona(s, "tutor", actor=a),
    "import": lambda s, a: import_card(s, _card(), actor=a),
}


@pytest.mark.parametrize("what", list(PERSONA_EDITS))
def test_persona_edits_need_persona_edit(store: Store, people: dict[str, UserInfo], what: str) -> None:
    edit = PERSONA_EDITS[what]
    _refused(store, lambda: edit(store, people["viewer"]), "persona.edit")
    edit(store, people["researcher"])
    entry = audit.recent(store, actor=people["admin"], limit=1, action_prefix="persona.")[0]
    assert entry.actor == "rita"  # attributed to the acting user


def test_promoting_needs_persona_promote(store: Store, people: dict[str, UserInfo]) -> None:
    _refused(store, lambda: set_production(store, "tutor@1", actor=people["viewer"]), "persona.promote")
    assert set_production(store, "tutor@1", actor=people["researcher"]).production


def test_deleting_a_conversation_is_for_admins(store: Store, people: dict[str, UserInfo]) -> None:
    with store.session() as session:
        conv = Conversation(persona_version_id=get_persona_version(session, "tutor").id, backend="fake", model="m")
        session.add(conv)
        session.flush()
        cid = conv.id
    for role in ("viewer", "researcher"):
        _refused(store, lambda role=role: delete_conversation(store, cid, actor=people[role]), "conversation.delete")
    delete_conversation(store, cid, actor=people["admin"])
    with store.session() as session:
        assert session.get(Conversation, cid) is None


def test_reports_need_report_run_and_another_database_needs_an_admin(
    store: Store, people: dict[str, UserInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_kernel() -> str:
        # Reached only once every check has passed; stops the run before a kernel starts or a row is stored.
        raise ConfigError("no kernel in this test")

    monkeypatch.setattr(reports, "_kernel_name", no_kernel)
    elsewhere = {"database_url": "sqlite:////tmp/elsewhere.db"}
    _refused(store, lambda: reports.run_report(store, "performance_report", actor=people["viewer"]), "report.run")
    _refused(
        store,
        lambda: reports.run_report(store, "performance_report", elsewhere, actor=people["researcher"]),
        "report.other_database",
    )
    for who, params in (("researcher", {"since": "-7d"}), ("admin", elsewhere)):
        with pytest.raises(ConfigError, match="no kernel"):
            reports.run_report(store, "performance_report", params, actor=people[who])
    assert reports.list_runs(store) == []


def test_sql_is_for_every_role_and_refused_without_one(
    store: Store, people: dict[str, UserInfo], tmp_path: Path
) -> None:
    an = Analytics(store, tmp_path / "analytics.duckdb")
    assert an.query("select 1 as one", actor=people["viewer"]).rows == [(1,)]
    assert an.export("select 1 as one", "csv", tmp_path / "one.csv", actor=people["viewer"]) == 1
    nobody = OperatorActor(username="guest", role="guest")
    _refused(store, lambda: an.query("select 1", actor=nobody), "sql.run")
    _refused(store, lambda: an.export("select 1", "csv", tmp_path / "two.csv", actor=nobody), "sql.run")
    assert not (tmp_path / "two.csv").exists()
    entries = audit.recent(store, actor=people["admin"], action_prefix="sql.")
    assert [e.actor for e in entries] == ["vera", "vera"]


def test_saved_queries_belong_to_their_owner_and_admins(store: Store, people: dict[str, UserInfo]) -> None:
    vera, rita, ada = people["viewer"], people["researcher"], people["admin"]
    mine = save_query(store, "Mine", "select 1", actor=vera, shared=True)
    assert mine.owner == "vera"
    _refused(store, lambda: delete_query(store, mine.id, actor=rita), "query.delete_others")
    _refused(store, lambda: save_query(store, "x", "select 1", actor=OperatorActor("g", "guest")), "query.save")
    with pytest.raises(NotFound, match="not a stored user"):  # the local operator has no account to own it
        save_query(store, "Ops", "select 1", actor=LOCAL_OPERATOR)
    delete_query(store, mine.id, actor=vera)  # the owner may, whatever the role
    theirs = save_query(store, "Rita's", "select 2", actor=rita)
    delete_query(store, theirs.id, actor=ada)  # an admin may delete anyone's
    assert [q.name for q in list_queries(store, vera.id) if not q.builtin] == []


def test_managing_users_is_for_admins(store: Store, people: dict[str, UserInfo]) -> None:
    changes: dict[str, Callable[[UserInfo], Any]] = {
        "create": lambda a: create_user(store, "nina", PW, role="viewer", actor=a),
        "role": lambda a: set_role(store, "vera", "researcher", actor=a),
        "password": lambda a: reset_password(store, "vera", "another-pass-1", actor=a),
        "unlock": lambda a: unlock(store, "vera", actor=a),
    }
    for role in ("viewer", "researcher"):
        for change in changes.values():
            _refused(store, lambda change=change, role=role: change(people[role]), "user.manage")
    for change in changes.values():
        change(people["admin"])
    with store.session() as session:
        assert session.scalar(select(User.role).where(User.username == "vera")) == "researcher"
        assert session.scalar(select(User.role).where(User.username == "nina")) == "viewer"


def test_the_audit_log_is_for_admins(store: Store, people: dict[str, UserInfo]) -> None:
    for role in ("viewer", "researcher"):
        _refused(store, lambda role=role: audit.recent(store, actor=people[role]), "audit.read")
    assert {e.target for e in audit.recent(store, actor=people["admin"], action_prefix="user.")} == {
        "ada",
        "rita",
        "vera",
    }


# -- the command line --------------------------------------------------------------------------------


def test_the_cli_acts_as_a_stored_user_and_a_refusal_is_one_line(run) -> None:
    run("db", "upgrade")
    for name, role in (("vera", "viewer"), ("rita", "researcher")):
        run("user", "add", name, "--role", role, "--password-stdin", input=f"{PW}\n")

    refused = run("--as", "vera", "persona", "promote", "receptionist@1", ok=False)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == (
        "Error: vera (viewer) may not move a persona's production label; allowed roles: admin, researcher\n"
    )
    assert "*" not in run("persona", "versions", "receptionist").stdout  # nothing was promoted

    # The environment names the same user; --as wins over it.
    env_refused = run("persona", "promote", "receptionist@1", ok=False, env_extra={"CALLBOT_CLI_USER": "vera"})
    assert env_refused.returncode == 1 and "vera (viewer) may not" in env_refused.stderr
    promoted = run("--as", "rita", "persona", "promote", "receptionist@1", env_extra={"CALLBOT_CLI_USER": "vera"})
    assert promoted.stdout == "receptionist@1 is now production.\n"

    user_add = run("--as", "rita", "user", "add", "nina", "--password-stdin", input=f"{PW}\n", ok=False)
    assert user_add.returncode == 1 and "rita (researcher) may not manage users" in user_add.stderr
    unknown = run("--as", "nobody", "persona", "promote", "receptionist@1", ok=False)
    assert unknown.returncode == 1 and "Unknown user 'nobody'" in unknown.stderr
    assert "Traceback" not in refused.stderr + env_refused.stderr + user_add.stderr + unknown.stderr
