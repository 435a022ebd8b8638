"""The SQL store on SQLite and PostgreSQL: migrations, seeds, users, the used-version guard, cascades."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.access.signin import create_user
from callbot_core.access.users import get_user, verify_password
from callbot_core.conversations.service import ConversationService
from callbot_core.conversations.transcripts import delete_conversation
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.personas.catalog import get_persona_version
from callbot_core.store.models import AuditLog, Base, Message, PersonaVersion, TurnMetrics, User
from callbot_core.store.seeds import default_personas, seed_default_personas


def test_migrations_reach_head_without_drift(store) -> None:
    cfg = store.alembic_config()
    command.check(cfg)  # raises if the models and the migrated schema differ
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_upgrade_is_idempotent_and_seeds_defaults_once(store) -> None:
    store.upgrade()
    assert seed_default_personas(store) == 0
    with store.session() as session:
        keys = {pv.persona.key for pv in session.scalars(select(PersonaVersion))}
        count = session.scalar(select(func.count()).select_from(PersonaVersion))
    assert keys == {"receptionist", "support", "sales", "tutor", "assistant"}
    assert count == len(default_personas())


def test_every_default_persona_has_a_greeting_and_prompt(store) -> None:
    with store.session() as session:
        for seed in default_personas():
            version = get_persona_version(session, seed["key"])
            assert version.version == 1
            assert version.greeting.strip()
            assert len(version.system_prompt) > 40


def test_persona_refs(store) -> None:
    with store.session() as session:
        assert get_persona_version(session, "tutor@1").persona.key == "tutor"
        with pytest.raises(NotFound, match="Unknown persona 'nobody'.*receptionist"):
            get_persona_version(session, "nobody")
        with pytest.raises(NotFound, match="no version 9"):
            get_persona_version(session, "tutor@9")
        with pytest.raises(InvalidInput, match="not a number"):
            get_persona_version(session, "tutor@x")


def test_users_are_stored_with_bcrypt_and_audited(store) -> None:
    create_user(store, "ada", "correct horse", role="admin", actor=OperatorActor(username="test", role="admin"))
    with store.session() as session:
        user = get_user(session, "ada")
        assert user is not None and user.role == "admin"
        assert user.password_hash.startswith("$2b$") and "correct horse" not in user.password_hash
        assert verify_password("correct horse", user.password_hash)
        assert not verify_password("wrong horse!", user.password_hash)
        audit = session.scalars(select(AuditLog).where(AuditLog.action == "user.add")).one()
        assert audit.target == "ada" and audit.actor == "test" and audit.detail == {"role": "admin"}


@pytest.mark.parametrize(
    ("username", "password", "role", "error"),
    [
        ("a", "long enough", "researcher", InvalidInput),
        ("bad name", "long enough", "researcher", InvalidInput),
        ("bob", "short", "researcher", InvalidInput),
        ("bob", "x" * 80, "researcher", InvalidInput),
        ("bob", "long enough", "superuser", InvalidInput),
    ],
)
def test_bad_users_are_refused_and_nothing_stored(store, username, password, role, error) -> None:
    with pytest.raises(error):
        create_user(store, username, password, role=role, actor=LOCAL_OPERATOR)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(User)) == 0


def test_duplicate_user_is_a_conflict(store) -> None:
    create_user(store, "ada", "long enough", actor=LOCAL_OPERATOR)
    with pytest.raises(Conflict, match="already exists"):
        create_user(store, "ada", "long enough", actor=LOCAL_OPERATOR)


def test_unused_version_may_change_but_used_version_may_not(store, settings, embedded) -> None:
    with store.session() as session:
        version = get_persona_version(session, "tutor")
        version.temperature = 0.3  # unused: allowed
    with store.session() as session:
        assert get_persona_version(session, "tutor").temperature == 0.3

    service = ConversationService(store, settings, backends=lambda name: embedded)
    service.start("tutor", actor=LOCAL_OPERATOR)
    with pytest.raises(Conflict, match="cannot change.*system_prompt"), store.session() as session:
        get_persona_version(session, "tutor").system_prompt = "Something else"
    with store.session() as session:
        assert get_persona_version(session, "tutor").system_prompt != "Something else"


def test_deleting_a_conversation_removes_its_messages_and_metrics(store, settings, embedded) -> None:
    from callbot_core.backends.llm import GenerationParams

    service = ConversationService(store, settings, backends=lambda name: embedded)
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    service.send(
        info.id, "Hi", params=GenerationParams(max_tokens=4, temperature=0, seed=1), actor=LOCAL_OPERATOR
    ).text()
    delete_conversation(store, info.id, actor=OperatorActor(username="ada", role="admin"), client_addr="127.0.0.1")
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Message)) == 0
        assert session.scalar(select(func.count()).select_from(TurnMetrics)) == 0
        row = session.scalars(select(AuditLog).where(AuditLog.action == "conversation.delete")).one()
        assert (row.actor, row.target, row.client_addr) == ("ada", str(info.id), "127.0.0.1")
    with pytest.raises(NotFound):
        delete_conversation(store, info.id, actor=LOCAL_OPERATOR)
