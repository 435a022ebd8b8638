"""The Admin page's API keys tab: make a key (shown once), see it listed by its first characters, revoke it."""

from __future__ import annotations

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.store import Store
from tests.app.helpers import ADMIN_PW, button, sign_in, view


def test_admin_makes_lists_and_revokes_a_key(app_store: Store) -> None:
    at = sign_in("admin", ADMIN_PW)
    at.switch_page(view("admin")).run()
    at.selectbox(key="admin_key_user").select("admin")
    at.text_input(key="admin_key_name").input("asterisk-lab")
    at.multiselect(key="admin_key_scopes").set_value(["read"])
    button(at, "Make key").click()
    at.run()
    shown = [c.value for c in at.code]
    assert len(shown) == 1 and shown[0].startswith("cbk_")
    key = shown[0]
    actor = apikeys.actor_for_key(app_store, key)
    assert actor is not None and actor.scopes == frozenset({"read"})
    table = at.dataframe[1].value  # users first, then keys
    assert list(table["name"])[0] == "asterisk-lab" and list(table["key"])[0] == key[:12] + "…"  # newest first

    at.run()  # shown once: the next run no longer has it
    assert [c.value for c in at.code] == []

    at.selectbox(key="admin_revoke_key_id").select_index(0)
    button(at, "Revoke").click()
    at.run()
    assert any("revoked" in s.value for s in at.success)
    assert apikeys.actor_for_key(app_store, key) is None
    assert apikeys.list_keys(app_store, actor=LOCAL_OPERATOR)[0].state() == "revoked"


def test_a_key_without_a_name_is_refused_on_the_page(app_store: Store) -> None:
    before = len(apikeys.list_keys(app_store, actor=LOCAL_OPERATOR))  # the app's store is shared by this module
    at = sign_in("admin", ADMIN_PW)
    at.switch_page(view("admin")).run()
    button(at, "Make key").click()
    at.run()
    assert any("Give the key a name" in e.value for e in at.error)
    assert len(apikeys.list_keys(app_store, actor=LOCAL_OPERATOR)) == before
