"""Admin: users (add, role, password, lock, unlock, delete), API keys (make, list, revoke), the audit log, and the
backends' health.

A new password, a new role and a lock end every open session of that user (the engine revokes them); an admin who
changes their own password or role is signed out here too, and signs in again."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from app.common import FAILED, backend_picker, client_addr, current_user, require, run_action, service, store
from callbot_core.access import apikeys, audit, sessions
from callbot_core.access.permissions import SCOPES
from callbot_core.access.signin import (
    LOCKED_UNTIL_UNLOCKED,
    create_user,
    delete_user,
    is_locked,
    list_users,
    lock,
    reset_password,
    set_role,
    unlock,
)
from callbot_core.errors import CallbotError
from callbot_core.store.models import ROLES, utcnow

user = current_user()
require("user.manage")
st.title("Admin")


FLASH = "admin_flash"


# The add-user form keeps what was typed when the engine refuses it (a taken name, a short password), and is
# emptied only after a user was added: its fields are cleared before they are drawn on the next run.
ADD_FIELDS = ("admin_new_username", "admin_new_display", "admin_new_email", "admin_new_password")
CLEAR_ADD = "admin_clear_add"


def _act(success: str, fn, *args, clear: Sequence[str] = (), **kwargs) -> None:  # type: ignore[no-untyped-def]
    """Run an admin action; on success redraw the page so every list shows the change."""
    if run_action(fn, *args, **kwargs) is not FAILED:
        st.session_state[FLASH] = success
        st.session_state[CLEAR_ADD] = list(clear)
        st.rerun()


for _key in st.session_state.pop(CLEAR_ADD, None) or ():
    st.session_state.pop(_key, None)


def _locked_until(u, now) -> str:  # type: ignore[no-untyped-def]
    if not is_locked(u, now):
        return ""
    return "until unlocked" if u.locked_until >= LOCKED_UNTIL_UNLOCKED else u.locked_until.strftime("%Y-%m-%d %H:%M")


if flash := st.session_state.pop(FLASH, None):
    st.success(flash)


users_tab, keys_tab, audit_tab, backend_tab = st.tabs(["Users", "API keys", "Audit log", "Backends"])
NEW_KEY = "admin_new_api_key"

with users_tab:
    now = utcnow()
    users = list_users(store())
    live = sessions.live_counts(store())
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "username": u.username,
                    "name": u.display_name,
                    "email": u.email or "",
                    "role": u.role,
                    "created": u.created_at.strftime("%Y-%m-%d") if u.created_at else "",
                    "last login": u.last_login_at.strftime("%Y-%m-%d %H:%M") if u.last_login_at else "never",
                    "failed logins": u.failed_logins,
                    "locked until": _locked_until(u, now),
                    "open sessions": live.get(u.username, 0),
                }
                for u in users
            ]
        ),
        hide_index=True,
        width="stretch",
    )
    names = [u.username for u in users]
    left, right = st.columns(2)
    with left, st.form("admin_add_user"):
        st.markdown("**Add a user**")
        new_name = st.text_input("Username", key="admin_new_username")
        new_display = st.text_input("Display name", key="admin_new_display")
        new_email = st.text_input("Email (optional)", key="admin_new_email")
        new_role = st.selectbox("Role", ROLES, index=ROLES.index("researcher"), key="admin_new_role")
        new_password = st.text_input("Password", type="password", key="admin_new_password")
        if st.form_submit_button("Add user"):
            _act(
                f"User {new_name.strip().lower()!r} added.",
                create_user,
                store(),
                new_name,
                new_password,
                role=new_role,
                display_name=new_display,
                email=new_email or None,
                actor=user,
                clear=ADD_FIELDS,
            )
    with right:
        with st.form("admin_role"):
            st.markdown("**Change a role**")
            who = st.selectbox("User", names, key="admin_role_user")
            role = st.selectbox("New role", ROLES, key="admin_role_role")
            if st.form_submit_button("Change role"):
                _act(f"{who} is now {role}; their open sessions have ended.", set_role, store(), who, role, actor=user,
                     client_addr=client_addr())  # fmt: skip
        with st.form("admin_password", clear_on_submit=True):
            st.markdown("**Reset a password**")
            who_pw = st.selectbox("User", names, key="admin_pw_user")
            password = st.text_input("New password", type="password", key="admin_pw_password")
            if st.form_submit_button("Reset password"):
                _act(f"Password of {who_pw} reset; their open sessions have ended.", reset_password, store(), who_pw,
                     password, actor=user, client_addr=client_addr())  # fmt: skip
        locked = [u.username for u in users if is_locked(u, now)]
        with st.form("admin_lock"):
            st.markdown("**Deactivate an account** (locked until an admin unlocks it; its history stays)")
            lockable = [n for n in names if n not in locked and n != user.username]
            who_locks = st.selectbox("User", lockable, key="admin_lock_user", placeholder="No one to lock")
            if st.form_submit_button("Lock", disabled=not lockable):
                _act(f"{who_locks} locked until unlocked; their open sessions have ended.", lock, store(), who_locks,
                     actor=user, client_addr=client_addr())  # fmt: skip
        with st.form("admin_unlock"):
            st.markdown("**Unlock an account**")
            who_lock = st.selectbox("Locked user", locked, key="admin_unlock_user", placeholder="No locked accounts")
            if st.form_submit_button("Unlock", disabled=not locked):
                _act(f"{who_lock} unlocked.", unlock, store(), who_lock, actor=user,
                     client_addr=client_addr())  # fmt: skip
        with st.form("admin_delete", clear_on_submit=True):
            st.markdown("**Delete an account**")
            deletable = [n for n in names if n != user.username]
            who_goes = st.selectbox("User", deletable, key="admin_delete_user", placeholder="No one to delete")
            sure = st.checkbox(
                "Their sessions and saved queries go too; their conversations stay", key="admin_delete_sure"
            )
            if st.form_submit_button("Delete", disabled=not deletable):
                if not sure:
                    st.error("Tick the box to confirm the deletion.")
                else:
                    _act(f"{who_goes} deleted; their open sessions have ended.", delete_user, store(), who_goes,
                         actor=user, client_addr=client_addr())  # fmt: skip

with keys_tab:
    st.caption(
        "Programs use the HTTP API with a key instead of a password (`Authorization: Bearer cbk_…`). A key acts as its "
        "user, never beyond their role, narrowed to its scopes. Only a hash is stored: a key is shown once."
    )
    if made := st.session_state.pop(NEW_KEY, None):
        st.success("Key made. Copy it now: it is not stored and cannot be shown again.")
        st.code(made, language=None)
    keys = apikeys.list_keys(store(), actor=user)
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "id": k.id,
                    "user": k.username,
                    "name": k.name,
                    "key": k.prefix + "…",
                    "scopes": ", ".join(k.scopes),
                    "state": k.state(now),
                    "expires": k.expires_at.strftime("%Y-%m-%d") if k.expires_at else "never",
                    "last used": k.last_used_at.strftime("%Y-%m-%d %H:%M") if k.last_used_at else "never",
                    "made by": k.created_by or "",
                }
                for k in keys
            ],
            columns=["id", "user", "name", "key", "scopes", "state", "expires", "last used", "made by"],
        ),
        hide_index=True,
        width="stretch",
    )
    make_col, revoke_col = st.columns(2)
    with make_col, st.form("admin_make_key", clear_on_submit=True):
        st.markdown("**Make a key**")
        key_user = st.selectbox("For user", names, key="admin_key_user")
        key_name = st.text_input("Name (what it is for)", key="admin_key_name", max_chars=apikeys.MAX_NAME_CHARS)
        key_scopes = st.multiselect("Scopes", SCOPES, default=list(apikeys.DEFAULT_SCOPES), key="admin_key_scopes")
        key_expiry = st.selectbox("Expires", ["never", "7d", "30d", "90d", "365d"], index=3, key="admin_key_expiry")
        if st.form_submit_button("Make key"):
            new = run_action(
                apikeys.create_key, store(), key_user, key_name, actor=user, scopes=key_scopes,
                expires_in=apikeys.parse_expiry(key_expiry), client_addr=client_addr(),
            )  # fmt: skip
            if new is not FAILED:
                st.session_state[NEW_KEY] = new.key
                st.rerun()
    with revoke_col, st.form("admin_revoke_key"):
        st.markdown("**Revoke a key** (refused from its next request on)")
        live_keys = [k for k in keys if k.state(now) == "active"]
        revoked = st.selectbox(
            "Key", live_keys, format_func=lambda k: f"#{k.id} {k.name} ({k.username}, {k.prefix}…)",
            key="admin_revoke_key_id", placeholder="No active keys",
        )  # fmt: skip
        if st.form_submit_button("Revoke", disabled=not live_keys) and revoked is not None:
            _act(f"Key #{revoked.id} {revoked.name!r} revoked.", apikeys.revoke_key, store(), revoked.id, actor=user,
                 client_addr=client_addr())  # fmt: skip

with audit_tab:
    prefix = st.selectbox(
        "Actions", ["all", "login.", "logout", "user.", "apikey.", "conversation."], key="admin_audit_prefix"
    )
    entries = audit.recent(store(), actor=user, limit=500, action_prefix=None if prefix == "all" else prefix)
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "when": e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "who": e.actor or "",
                    "action": e.action,
                    "target": e.target or "",
                    "detail": "" if e.detail is None else ", ".join(f"{k}={v}" for k, v in e.detail.items()),
                    "from": e.client_addr or "",
                }
                for e in entries
            ],
            columns=["when", "who", "action", "target", "detail", "from"],
        ),
        hide_index=True,
        width="stretch",
    )

with backend_tab:
    svc = service()
    name = backend_picker(key="admin_backend")
    st.caption(f"Configured default: **{svc.settings.llm_backend}**")
    try:
        llm = svc.backend(name)
        health = llm.health()
    except CallbotError as exc:
        st.error(str(exc))
    else:
        (st.success if health.ok else st.error)(f"{health.backend} at {health.where}: "
                                                f"{'healthy' if health.ok else 'down'} — {health.detail}")  # fmt: skip
        if health.ok:
            try:
                st.dataframe(pd.DataFrame({"model": llm.list_models()}), hide_index=True)
            except CallbotError as exc:
                st.error(str(exc))
