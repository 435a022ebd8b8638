"""Callbot Workbench in the browser: sign-in, then the pages this user's role allows.

Run with `callbot app`. Every page sits behind the login below; Streamlit's own /_stcore/health is
the only route that answers without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Streamlit puts this folder on sys.path, not the project root; the pages import `app.common`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402
import streamlit_authenticator as stauth  # noqa: E402
from streamlit_authenticator.utilities import LoginError  # noqa: E402

from app.common import USER_KEY, client_addr, settings, store  # noqa: E402
from callbot_core.access import audit  # noqa: E402
from callbot_core.access.permissions import allowed  # noqa: E402
from callbot_core.access.signin import AccountLocked, UserInfo, active_usernames, authenticate  # noqa: E402

VIEWS = Path(__file__).parent / "views"
COOKIE_NAME = "callbot_auth"
WANTED_PAGE = "cb_wanted_page"
# streamlit-authenticator waits this long before showing the form so its cookie component can report a
# saved sign-in; its 0.7 s default makes every fresh page load feel slow.
LOGIN_SLEEP_S = 0.3

st.set_page_config(page_title="Callbot Workbench", page_icon=":telephone_receiver:", layout="wide")


def _authenticator(users: dict[str, UserInfo]) -> stauth.Authenticate:
    credentials = {
        "usernames": {
            name: {
                "name": info.display_name,
                "email": info.email or "",
                # Never checked: `check_credentials` is replaced below by the store's own check, so the
                # hash, the lockout and the audit live in one place. A bcrypt-shaped value keeps the
                # library from trying to hash it.
                "password": "$2b$12$" + "x" * 53,
                "roles": [info.role],
            }
            for name, info in users.items()
        }
    }
    authenticator = stauth.Authenticate(
        credentials,
        cookie_name=COOKIE_NAME,
        cookie_key=settings().secret(),  # signs the re-login cookie (HS256 JWT)
        cookie_expiry_days=1,
        auto_hash=False,
        login_sleep_time=LOGIN_SLEEP_S,
    )

    def check_credentials(username: str, password: str) -> bool:
        try:
            return authenticate(store(), username, password, client_addr=client_addr()) is not None
        except AccountLocked as exc:
            raise LoginError(str(exc)) from exc

    authenticator.authentication_controller.authentication_model.check_credentials = check_credentials  # type: ignore[method-assign]
    return authenticator


def _signed_in_user() -> tuple[UserInfo | None, stauth.Authenticate]:
    users = active_usernames(store())
    authenticator = _authenticator(users)
    try:
        authenticator.login(location="main", fields={"Form name": "Sign in to Callbot Workbench"})
    except LoginError as exc:
        st.error(str(exc))
        return None, authenticator
    # No st.rerun() after a form sign-in: it would cancel the cookie component that is writing the
    # sign-in cookie. The form goes away on the rerun that component triggers once the cookie is set.
    status = st.session_state.get("authentication_status")
    username = st.session_state.get("username")
    if status and username in users:
        return users[username], authenticator
    if status and username not in users:
        # Locked or removed since the cookie was issued: sign out now rather than trust the cookie.
        authenticator.logout(location="unrendered")
        st.error("This account can no longer sign in; ask an admin.")
    elif status is False:
        st.error("Username or password is incorrect.")
    return None, authenticator


def _remember_wanted_page() -> None:
    """Keep the page a signed-out visitor asked for (/conversations, /admin…) to open after sign-in.

    Without this a deep link is lost: the cookie component's first answer reruns the script before
    it reaches st.navigation, and that rerun carries no page.
    """
    try:
        url = st.context.url
    except Exception:  # no browser behind the session (tests, bare mode)
        return
    if isinstance(url, str):
        path = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if path in PAGE_PATHS:
            st.session_state.setdefault(WANTED_PAGE, path)


PAGE_PATHS = (
    "chat", "compare", "conversations", "personas", "analytics", "dashboards", "leaderboard", "reports", "admin",
)  # fmt: skip
if not st.session_state.get("authentication_status"):
    _remember_wanted_page()

user, authenticator = _signed_in_user()
if user is None:
    st.session_state.pop(USER_KEY, None)
    st.stop()
st.session_state[USER_KEY] = user

# A page the role cannot use is not offered at all; the engine refuses its actions anyway.
pages = []
if allowed(user, "chat"):
    pages.append(st.Page(VIEWS / "chat.py", title="Chat", icon=":material/chat:", url_path="chat"))
if allowed(user, "compare"):
    pages.append(st.Page(VIEWS / "compare.py", title="Compare", icon=":material/compare:", url_path="compare"))
pages.append(
    st.Page(VIEWS / "conversations.py", title="Conversations", icon=":material/forum:", url_path="conversations")
)
pages.append(st.Page(VIEWS / "personas.py", title="Personas", icon=":material/person:", url_path="personas"))
pages.append(st.Page(VIEWS / "analytics.py", title="Analytics", icon=":material/query_stats:", url_path="analytics"))
pages.append(st.Page(VIEWS / "dashboards.py", title="Dashboards", icon=":material/monitoring:", url_path="dashboards"))
pages.append(st.Page(VIEWS / "leaderboard.py", title="Leaderboard", icon=":material/trophy:", url_path="leaderboard"))
pages.append(st.Page(VIEWS / "reports.py", title="Reports", icon=":material/description:", url_path="reports"))
if allowed(user, "user.manage"):
    pages.append(st.Page(VIEWS / "admin.py", title="Admin", icon=":material/admin_panel_settings:", url_path="admin"))

with st.sidebar:
    st.caption(f"Signed in as **{user.display_name}** ({user.role})")
    authenticator.logout(
        "Sign out",
        location="sidebar",
        callback=lambda _: audit.log(store(), "logout", actor=user.username, client_addr=client_addr()),
    )
    if not st.session_state.get("authentication_status"):
        # Keep the library's `logout` flag (it stops the cookie signing the user straight back in) and
        # stop rather than rerun, so the cookie component can delete the cookie in the browser.
        for key in [k for k in st.session_state if k != "logout"]:
            del st.session_state[key]
        st.stop()

current = st.navigation(pages)
wanted = st.session_state.pop(WANTED_PAGE, None)
target = next((p for p in pages if p.url_path == wanted), None)
if target is not None and target.url_path != current.url_path:
    st.switch_page(target)
current.run()
