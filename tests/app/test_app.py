"""The Streamlit app through AppTest: sign-in and lockout, pages per role, a real chat turn with the
embedded model, failures and retry through an Ollama-protocol server, the Conversations and Admin pages."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import MAX_FAILED_LOGINS, create_user, get_user_info
from callbot_core.errors import NotFound
from callbot_core.store import Store
from callbot_core.store.models import AuditLog
from tests.app.helpers import (
    ADMIN_PW,
    APP,
    PW,
    button,
    known_pages_error,
    new_app,
    sign_in,
    titles,
)
from tests.fake_ollama import FakeOllama

# -- sign-in -----------------------------------------------------------------------------------


def test_nothing_shows_before_sign_in(app_store: Store) -> None:
    at = new_app()
    at.run()
    assert titles(at) == []
    assert [b.label for b in at.button] == ["Login"]
    assert not at.chat_input and not at.dataframe


def test_right_password_signs_in_and_is_audited(app_store: Store) -> None:
    at = sign_in("admin", ADMIN_PW)
    assert titles(at) == ["Chat"]
    assert "Login" not in [b.label for b in at.button]
    assert get_user_info(app_store, "admin").last_login_at is not None
    with app_store.session() as session:
        assert session.scalars(select(AuditLog).where(AuditLog.action == "login.ok")).first() is not None


def test_wrong_password_is_refused(app_store: Store) -> None:
    at = sign_in("rita", "not-the-password")
    assert "Username or password is incorrect." in [e.value for e in at.error]
    assert titles(at) == []
    assert get_user_info(app_store, "rita").failed_logins == 1
    at = sign_in("rita", PW)  # a success resets the count
    assert titles(at) == ["Chat"]
    assert get_user_info(app_store, "rita").failed_logins == 0


def test_five_failures_lock_the_account_until_an_admin_unlocks_it(app_store: Store) -> None:
    create_user(app_store, "luke", PW, role="researcher", actor=LOCAL_OPERATOR)
    for _ in range(MAX_FAILED_LOGINS - 1):
        assert "Username or password is incorrect." in [e.value for e in sign_in("luke", "wrong-wrong").error]
    fifth = sign_in("luke", "wrong-wrong")
    # The lock is not announced: a locked account answers as a wrong password does (the audit log says which).
    assert [e.value for e in fifth.error] == ["Username or password is incorrect."]
    # Even the right password is refused while locked.
    locked = sign_in("luke", PW)
    assert [e.value for e in locked.error] == ["Username or password is incorrect."] and titles(locked) == []
    assert get_user_info(app_store, "luke").locked_until is not None

    admin = sign_in("admin", ADMIN_PW)
    admin.switch_page(str(Path(APP).parent / "views" / "admin.py")).run()
    admin.selectbox(key="admin_unlock_user").select("luke")
    button(admin, "Unlock").click()
    admin.run()
    assert "luke unlocked." in [s.value for s in admin.success]
    assert titles(sign_in("luke", PW)) == ["Chat"]
    with app_store.session() as session:
        actions = set(session.scalars(select(AuditLog.action).where(AuditLog.target == "luke")))
    assert {"user.locked", "user.unlock"} <= actions


def test_sign_out(app_store: Store) -> None:
    at = sign_in("rita", PW)
    button(at, "Sign out").click()
    at.run()
    assert titles(at) == [] and not at.chat_input
    at.run()  # in a browser, the cookie component's answer to the deletion reruns the script
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    with app_store.session() as session:
        assert session.scalars(select(AuditLog).where(AuditLog.action == "logout")).first() is not None


# -- roles -------------------------------------------------------------------------------------


def test_pages_per_role(app_store: Store) -> None:
    viewer = sign_in("vera", PW)
    assert titles(viewer) == ["Conversations"]
    known = known_pages_error(viewer, str(Path(APP).parent / "views" / "chat.py"))
    assert "conversations.py" in known and "chat.py'" not in known.split("Known pages")[1]
    known_pages_error(viewer, str(Path(APP).parent / "views" / "admin.py"))

    researcher = sign_in("rita", PW)
    assert titles(researcher) == ["Chat"]
    known_pages_error(researcher, str(Path(APP).parent / "views" / "admin.py"))

    admin = sign_in("admin", ADMIN_PW)
    admin.switch_page(str(Path(APP).parent / "views" / "admin.py")).run()
    assert titles(admin) == ["Admin"]


# -- chat --------------------------------------------------------------------------------------


def _start(at: AppTest, backend: str = "embedded") -> None:
    at.selectbox(key="chat_persona").select_index(
        [o for o in at.selectbox(key="chat_persona").options].index(
            next(o for o in at.selectbox(key="chat_persona").options if "(receptionist)" in o)
        )
    )
    at.selectbox(key="chat_backend").select(backend)
    at.run()
    button(at, "New conversation").click()
    at.run()
    assert not at.exception, at.exception


def _chat_texts(at: AppTest) -> list[str]:
    return [m.markdown[0].value for m in at.chat_message if m.markdown]


@pytest.mark.model
def test_a_chat_turn_with_the_embedded_model(app_store: Store) -> None:
    at = sign_in("rita", PW)
    _start(at)
    assert _chat_texts(at) == ["Good morning, you've reached the clinic. How can I help you today?"]
    at.chat_input(key="chat_input").set_value("What are your opening hours?").run()
    assert not at.exception, at.exception
    texts = _chat_texts(at)
    assert texts[1] == "What are your opening hours?"
    assert len(texts) == 3 and len(texts[2]) > 5
    chips = [md.value for md in at.markdown if "TTFT" in md.value]
    assert chips and "tok/s" in chips[-1] and "tokens" in chips[-1]

    button(at, "End conversation").click()
    at.run()
    assert "This conversation has ended." in [s.value for s in at.success]
    assert [h.value for h in at.subheader] == ["Summary"]
    assert not at.chat_input


def test_html_in_messages_is_shown_as_text(app_store: Store) -> None:
    at = sign_in("rita", PW)
    _start(at, backend="ollama")
    at.chat_input(key="chat_input").set_value("<script>alert(1)</script> <b>hi</b>").run()
    # Passed to Markdown as typed; Streamlit shows HTML as text (the browser test checks the rendering).
    assert _chat_texts(at)[1] == "<script>alert(1)</script> <b>hi</b>"
    assert not at.html  # nothing on the page is rendered as raw HTML
    at.chat_input(key="chat_input").set_value("look ![pixel](http://127.0.0.1:9/track.png)").run()
    assert _chat_texts(at)[3] == "look \\![pixel](http://127.0.0.1:9/track.png)"  # a link, not an image


def test_a_failed_turn_is_explained_and_can_be_retried(app_store: Store, fake_ollama: FakeOllama) -> None:
    at = sign_in("rita", PW)
    _start(at, backend="ollama")
    fake_ollama.mode = "error500"
    try:
        at.chat_input(key="chat_input").set_value("Are you open on Sunday?").run()
        errors = [e.value for e in at.error]
        assert any(e.startswith("The turn failed: Ollama at") and "500" in e for e in errors), errors
        at.run()
        assert "The last turn failed and was not answered." in [w.value for w in at.warning]
    finally:
        fake_ollama.mode = "normal"
    button(at, "Retry the last message").click()
    at.run()
    assert not at.error
    at.run()
    texts = _chat_texts(at)
    assert texts[-1] == "Our hours are 8 to 6."
    assert texts.count("Are you open on Sunday?") == 2  # the failed attempt stays on record, marked failed
    assert any("failed" in c.value for c in at.caption)


def test_an_empty_message_is_not_sent(app_store: Store) -> None:
    at = sign_in("rita", PW)
    _start(at, backend="ollama")
    at.chat_input(key="chat_input").set_value("   ").run()
    assert any("Not sent: The message is empty" in w.value for w in at.warning)


# -- conversations -----------------------------------------------------------------------------


def test_conversations_page_lists_searches_opens_exports_and_deletes(app_store: Store) -> None:
    chat = sign_in("rita", PW)
    _start(chat, backend="ollama")
    chat.chat_input(key="chat_input").set_value("I would like a flamingo appointment").run()

    at = sign_in("admin", ADMIN_PW)
    at.switch_page(str(Path(APP).parent / "views" / "conversations.py")).run()
    assert titles(at) == ["Conversations"]
    table = at.dataframe[0].value
    assert {"id", "persona", "user", "turns", "mean TTFT ms"} <= set(table.columns)
    assert "rita" in set(table["user"])

    assert "None" not in table.astype(str).to_numpy()  # missing values read "–"

    at.text_input(key="conv_search").input("flamingo").run()
    found = at.dataframe[0].value
    assert len(found) == 1 and found.iloc[0]["user"] == "rita"
    cid = int(found.iloc[0]["id"])
    # Each hit shows where it was said, the match highlighted and the rest shown as typed.
    snippets = [md.value for md in at.markdown if md.value.startswith(f"**#{cid}**")]
    assert snippets and ":orange-background[flamingo]" in snippets[0] and "user" in snippets[0]

    at.selectbox(key="conv_open_select").select(cid).run()
    assert f"Conversation {cid}" in [h.value for h in at.subheader]
    assert any("flamingo" in t for t in _chat_texts(at))
    assert any(md.value.startswith("#####") for md in at.markdown)  # grouped under a date heading

    # One click exports what is listed: the buttons are downloads themselves.
    assert {"Export 1 as CSV", "Export 1 as JSONL"} <= {b.label for b in at.get("download_button")}

    at.checkbox(key="conv_delete_ok").check().run()
    button(at, "Delete").click()
    at.run()
    assert not at.exception
    assert at.text_input(key="conv_search").value == "flamingo"
    assert "No conversations match these filters." in [i.value for i in at.info]
    with app_store.session() as session:
        row = session.scalars(select(AuditLog).where(AuditLog.action == "conversation.delete")).one()
        assert row.actor == "admin" and row.target == str(cid)


def test_only_admins_may_delete(app_store: Store) -> None:
    at = sign_in("vera", PW)
    rows = at.dataframe[0].value if at.dataframe else None
    if rows is not None and len(rows):
        at.selectbox(key="conv_open_select").select(int(rows.iloc[0]["id"])).run()
    assert "Delete" not in [b.label for b in at.button]


# -- admin -------------------------------------------------------------------------------------


def test_admin_adds_a_user_changes_a_role_and_resets_a_password(app_store: Store) -> None:
    at = sign_in("admin", ADMIN_PW)
    at.switch_page(str(Path(APP).parent / "views" / "admin.py")).run()
    at.text_input(key="admin_new_username").input("Nina")
    at.text_input(key="admin_new_display").input("Nina N.")
    at.text_input(key="admin_new_password").input("short")
    button(at, "Add user").click()
    at.run()
    # Refused: the form keeps what was typed, so only the password needs fixing.
    assert any("too short" in e.value for e in at.error)
    assert at.text_input(key="admin_new_username").value == "Nina"
    assert at.text_input(key="admin_new_display").value == "Nina N."
    at.text_input(key="admin_new_password").input("nina-pass-123")
    at.selectbox(key="admin_new_role").select("viewer")
    button(at, "Add user").click()
    at.run()
    assert "User 'nina' added." in [s.value for s in at.success]
    assert at.text_input(key="admin_new_username").value == ""  # emptied once the user exists
    assert get_user_info(app_store, "nina").role == "viewer"

    at.selectbox(key="admin_role_user").select("nina")
    at.selectbox(key="admin_role_role").select("researcher")
    button(at, "Change role").click()
    at.run()
    assert get_user_info(app_store, "nina").role == "researcher"

    at.selectbox(key="admin_pw_user").select("nina")
    at.text_input(key="admin_pw_password").input("short")
    button(at, "Reset password").click()
    at.run()
    assert any("too short" in e.value for e in at.error)
    at.selectbox(key="admin_pw_user").select("nina")
    at.text_input(key="admin_pw_password").input("brand-new-pass")
    button(at, "Reset password").click()
    at.run()
    assert titles(sign_in("nina", "brand-new-pass")) == ["Chat"]

    audit_frame = next(df.value for df in at.dataframe if "action" in df.value.columns)
    assert {"user.add", "user.role"} <= set(audit_frame["action"])

    # Deleting asks for the tick first, then removes the account.
    at.selectbox(key="admin_delete_user").select("nina")
    button(at, "Delete").click()
    at.run()
    assert "Tick the box to confirm the deletion." in [e.value for e in at.error]
    assert get_user_info(app_store, "nina").username == "nina"
    at.selectbox(key="admin_delete_user").select("nina")
    at.checkbox(key="admin_delete_sure").check()
    button(at, "Delete").click()
    at.run()
    assert "nina deleted; their open sessions have ended." in [s.value for s in at.success]
    with pytest.raises(NotFound):
        get_user_info(app_store, "nina")


@pytest.mark.model
def test_admin_sees_backend_health_and_models(app_store: Store) -> None:
    at = sign_in("admin", ADMIN_PW)
    at.switch_page(str(Path(APP).parent / "views" / "admin.py")).run()
    assert any("embedded" in s.value and "healthy" in s.value for s in at.success)
    models = next(df.value for df in at.dataframe if "model" in df.value.columns)
    assert list(models["model"]) == ["SmolLM2-135M-Instruct.Q4_1"]
    at.selectbox(key="admin_backend").select("ollama").run()
    assert any("ollama" in s.value for s in at.success)
