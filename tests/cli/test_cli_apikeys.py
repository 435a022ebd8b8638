"""`callbot apikey create | list | revoke`, in-process on SQLite and PostgreSQL: a key printed once, listed without
its secret, refused once revoked; bad options answered in one line."""

from __future__ import annotations

import pytest

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import create_user
from callbot_core.store import Store


def test_a_key_is_printed_once_listed_without_it_and_revoked(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", "long-enough-1", actor=LOCAL_OPERATOR)
    made = callbot(
        "apikey", "create", "--user", "rita", "--name", "asterisk-lab", "--scope", "chat", "--expires", "90d"
    )
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[0]
    assert key.startswith("cbk_") and "cannot be shown again" in made.stderr
    actor = apikeys.actor_for_key(store, key)
    assert actor is not None and actor.username == "rita" and actor.scopes == frozenset({"chat"})

    listed = callbot("apikey", "list")
    assert listed.exit_code == 0
    assert "asterisk-lab" in listed.output and "active" in listed.output
    assert key not in listed.output and key[:12] + "…" in listed.output

    key_id = apikeys.list_keys(store, actor=LOCAL_OPERATOR)[0].id
    revoked = callbot("apikey", "revoke", str(key_id))
    assert revoked.exit_code == 0 and f"Revoked API key #{key_id}" in revoked.output
    assert apikeys.actor_for_key(store, key) is None
    assert "revoked" in callbot("apikey", "list").output
    assert "already revoked" in callbot("apikey", "revoke", str(key_id)).output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "ghost", "--name", "x"], "Unknown user 'ghost'"),
        (["--user", "rita", "--name", "x", "--scope", "root"], "Unknown scope 'root'"),
        (["--user", "rita", "--name", "x", "--expires", "soon"], "Expiry 'soon' is not valid"),
        (["--user", "rita", "--name", " "], "Give the key a name"),
    ],
)
def test_bad_options_are_named(store: Store, callbot, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", "long-enough-1", actor=LOCAL_OPERATOR)
    result = callbot("apikey", "create", *args)
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert apikeys.list_keys(store, actor=LOCAL_OPERATOR) == []


def test_a_researcher_acting_on_the_cli_may_not_make_keys(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", "long-enough-1", actor=LOCAL_OPERATOR)
    result = callbot("--as", "rita", "apikey", "create", "--user", "rita", "--name", "mine")
    assert result.exit_code != 0
    assert "may not create, list or revoke API keys" in str(result.exception)
