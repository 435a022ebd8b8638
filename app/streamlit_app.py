"""Callbot Workbench in the browser: sign-in, then the pages this user's role allows.

Run with `callbot app`. Every page sits behind the login below; Streamlit's own /_stcore/health is
the only route that answers without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

# Streamlit puts this folder on sys.path, not the project root; the pages import `app.common`.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jwt  # noqa: E402
import streamlit as st  # noqa: E402
import streamlit_authenticator as stauth  # noqa: E402
from streamlit.navigation.page import StreamlitPage  # noqa: E402
from streamlit.runtime.scriptrunner import get_script_run_ctx  # noqa: E402
from streamlit_authenticator.models import CookieModel  # noqa: E402
from streamlit_authenticator.utilities import LoginError  # noqa: E402

from app.common import USER_KEY, client_addr, safe_markdown, settings, store  # noqa: E402
from app.failures import run_page  # noqa: E402
from callbot_core.access import sessions  # noqa: E402
from callbot_core.access.permissions import allowed  # noqa: E402
from callbot_core.access.signin import UserInfo, authenticate  # noqa: E402

VIEWS = Path(__file__).parent / "views"
COOKIE_NAME = "callbot_auth"
# This browser session's store session token (`callbot_core.access.sessions`); the cookie carries it across reloads.
SESSION_KEY = "cb_session_token"
DEAD_COOKIE_KEY = "cb_dead_cookie"
# A sign-in cookie this browser session has asked the browser to store and the browser has not yet confirmed.
PENDING_COOKIE_KEY = "cb_cookie_pending"
# The component key of a cookie deletion (sign-out, a dead cookie) the browser has not yet confirmed.
PENDING_DELETE_KEY = "cb_cookie_delete_pending"
# The page this browser session is on: before sign-in, the one its address asked for (see `_stay_on_page`).
PAGE_KEY = "cb_page"
# Set once this browser tab has been sent the signed-in navigation, which it keeps showing until it is sent another.
NAVIGATION_KEY = "cb_navigation_drawn"
# streamlit-authenticator waits this long before showing the form so its cookie component can report a
# saved sign-in; its 0.7 s default makes every fresh page load feel slow.
LOGIN_SLEEP_S = 0.3
WRONG = "Username or password is incorrect."
ENDED = "Your session has ended; please sign in again."

st.set_page_config(page_title="Callbot Workbench", page_icon=":telephone_receiver:", layout="wide")


def _cookie_claims(raw: str, key: str) -> dict[str, object] | None:
    """The sign-in cookie's claims if we signed it (HS256 with our secret), else None. Anything else (another
    algorithm, `alg: none`, another key, garbage) is a visitor who is not signed in, never an error."""
    try:
        claims = jwt.decode(raw, key, algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("sid"), str):
        return None  # a cookie from before sessions were stored, or not ours
    return claims


class StoreSessionCookie(CookieModel):
    """streamlit-authenticator's re-login cookie, carrying the store session's token instead of standing for the
    sign-in itself: a cookie signs a browser in only while its session is live in the store, so signing out,
    a new password or role, an admin's lock or deleting the user ends it, copies included."""

    def __init__(self, base: CookieModel, admit: Callable[[UserInfo], None]) -> None:
        # Adopt the library's model instead of calling its __init__, which would draw a second cookie component.
        self.__dict__.update(base.__dict__)
        self._admit = admit

    def get_cookie(self) -> dict[str, object] | None:
        if st.session_state.get("logout"):
            return None
        raw = st.context.cookies.get(self.cookie_name)
        # The request's cookies stay as they were when the page loaded: a cookie found dead once is dead for this
        # browser session, and deleting it again would race the new cookie a sign-in is about to set.
        if not raw or st.session_state.get(DEAD_COOKIE_KEY) == raw:
            return None
        claims = _cookie_claims(raw, self.cookie_key)
        user = sessions.user_for(store(), claims["sid"]) if claims else None  # type: ignore[arg-type]
        if claims is None or user is None:
            st.session_state[DEAD_COOKIE_KEY] = raw
            st.info(ENDED)
            self.delete_cookie()
            return None
        st.session_state[SESSION_KEY] = claims["sid"]
        self._admit(user)
        return {"username": user.username, "exp_date": claims.get("exp_date")}

    def delete_cookie(self) -> None:
        """Called by the library on sign-out, and by `get_cookie` for a dead cookie. As with `set_cookie`, a rerun
        before the cookie component has loaded takes it off the page with the cookie still in the browser (seen in
        CI: a sign-out right after a sign-in whose cookie write answered just after the click). So the deletion is
        recorded here and drawn by `write_pending` until the browser confirms it; a sign-in's new cookie replaces
        it (`set_cookie`). The cookie left behind would not sign anyone in (its store session has ended), but the
        browser should not keep it."""
        st.session_state[PENDING_DELETE_KEY] = "cb_delete_cookie_" + secrets.token_hex(8)

    def set_cookie(self) -> None:
        """Called by the library in the run that signs in from the form. The browser stores the cookie only once the
        cookie component on the page has loaded, and a rerun before then (another component answering, as the
        cookie reader does in a tab that signed out and in again) takes the component off the page with the cookie
        unwritten. So the cookie is only recorded here and drawn by `write_pending` until the browser confirms it."""
        if not self.cookie_expiry_days:
            return
        self.exp_date = self._set_exp_date()
        token = self._token_encode()
        st.session_state.pop(PENDING_DELETE_KEY, None)  # the new cookie replaces the old one
        st.session_state[PENDING_COOKIE_KEY] = {
            "token": token,
            "expires_at": datetime.now() + timedelta(days=self.cookie_expiry_days),
            # One component per cookie: its answer (True once stored) is this cookie's confirmation and no other's.
            "key": "cb_set_cookie_" + hashlib.sha256(token.encode()).hexdigest()[:16],
        }

    def write_pending(self) -> None:
        """Draw the cookie component that deletes the cookie, or the one that stores the pending sign-in cookie, on
        every run until it answers that the browser has done it. The same key and arguments each run keep the same
        component on the page. Called once per run, signed in or not."""
        deleting = st.session_state.get(PENDING_DELETE_KEY)
        if deleting and st.session_state.get(deleting) is True:
            del st.session_state[PENDING_DELETE_KEY]
        elif deleting:
            # It draws the component, then forgets the cookie in its own record of the page's cookies, which may
            # not hold it (KeyError): nothing to undo.
            with contextlib.suppress(KeyError):
                self.cookie_manager.delete(self.cookie_name, key=deleting)
        pending = st.session_state.get(PENDING_COOKIE_KEY)
        if not pending:
            return
        if st.session_state.get(pending["key"]) is True:
            del st.session_state[PENDING_COOKIE_KEY]
            return
        self.cookie_manager.set(
            self.cookie_name, pending["token"], key=pending["key"], expires_at=pending["expires_at"]
        )

    def _token_encode(self) -> str:
        payload = {"username": st.session_state["username"], "sid": st.session_state[SESSION_KEY],
                   "exp_date": self.exp_date}  # fmt: skip
        return jwt.encode(payload, self.cookie_key, algorithm="HS256")


def _authenticator() -> stauth.Authenticate:
    """The library's form and cookie; the store decides who signs in (`authenticate`) and for how long (a store
    session). The library's credentials start empty: a user is added once the store has let them in."""
    authenticator = stauth.Authenticate(
        {"usernames": {}},
        cookie_name=COOKIE_NAME,
        cookie_key=settings().secret(),  # signs the cookie (HS256 JWT); the store session is what counts
        cookie_expiry_days=sessions.SESSION_TTL.total_seconds() / 86400,
        auto_hash=False,
        login_sleep_time=LOGIN_SLEEP_S,
    )
    model = authenticator.authentication_controller.authentication_model

    def admit(user: UserInfo) -> None:
        # "password" is never read: `check_credentials` below is the store's own check.
        model.credentials["usernames"][user.username] = {
            "name": user.display_name, "email": user.email or "", "password": "", "roles": [user.role],
        }  # fmt: skip

    def check_credentials(username: str, password: str) -> bool:
        user = authenticate(store(), username, password, client_addr=client_addr())
        if user is None:
            return False
        st.session_state[SESSION_KEY] = sessions.start(store(), user, client_addr=client_addr()).token
        admit(user)
        return True

    def login_as_typed(
        username: str | None = None, password: str | None = None, max_concurrent_users: int | None = None,
        max_login_attempts: int | None = None, token: dict | None = None, single_session: bool = False,
        callback: Callable | None = None, **_: object,
    ) -> bool | None:  # fmt: skip
        # The library strips the password; ours is taken as typed, as it was when it was set (spaces included).
        name = username.strip().lower() if username else username
        return model.login(name, password, max_concurrent_users, max_login_attempts, token, single_session, callback)

    model.check_credentials = check_credentials  # type: ignore[method-assign]
    authenticator.authentication_controller.login = login_as_typed  # type: ignore[method-assign]
    cookies = authenticator.cookie_controller
    cookies.cookie_model = StoreSessionCookie(cookies.cookie_model, admit)
    return authenticator


def _signed_in_user() -> tuple[UserInfo | None, stauth.Authenticate]:
    authenticator = _authenticator()
    if st.session_state.get("authentication_status"):
        # Every rerun asks the store: the session may have been revoked or have expired since the last one.
        user = sessions.user_for(store(), st.session_state.get(SESSION_KEY))
        if user is not None:
            return user, authenticator
        authenticator.logout(location="unrendered")  # deletes the cookie; the form below is drawn again
        st.session_state.pop(SESSION_KEY, None)
        st.info(ENDED)
    try:
        authenticator.login(location="main", fields={"Form name": "Sign in to Callbot Workbench"})
    except LoginError as exc:
        st.error(str(exc))
        return None, authenticator
    # No st.rerun() after a form sign-in: it would cancel the cookie component that is writing the
    # sign-in cookie. The form goes away on the rerun that component triggers once the cookie is set.
    status = st.session_state.get("authentication_status")
    if status:
        user = sessions.user_for(store(), st.session_state.get(SESSION_KEY))
        if user is not None:
            return user, authenticator
    elif status is False:
        # The same line for a wrong password, an unknown name, a locked account and a throttled address.
        st.error(WRONG)
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
            st.session_state.setdefault(PAGE_KEY, path)


PAGE_PATHS = (
    "chat", "compare", "conversations", "personas", "knowledge", "analytics", "dashboards", "leaderboard", "reports",
    "admin",
)  # fmt: skip


def _sign_in_page() -> None:
    """Never run: the sign-in form is drawn before the navigation (see `_signed_out_navigation`)."""


def _signed_out_navigation() -> None:
    """In a tab that has shown the signed-in navigation (and signed out since), replace it with one listing nothing:
    the browser keeps showing the last navigation it was sent, so the previous user's pages would stay listed.

    Every page path stays a (hidden) page, so the tab keeps its address and opens that page after the next sign-in.
    Hidden pages rather than a hidden navigation, under which the browser keeps an emptied sidebar open. A tab that
    never signed in is sent no navigation: its first rerun can come before it has said which page it asked for,
    and a navigation would then move a deep link's address to the first page (`_remember_wanted_page` keeps it).
    """
    if not st.session_state.get(NAVIGATION_KEY):
        return
    signed_out = [st.Page(_sign_in_page, title="Sign in", url_path="sign-in", default=True, visibility="hidden")]
    signed_out += [st.Page(_sign_in_page, title="Sign in", url_path=p, visibility="hidden") for p in PAGE_PATHS]
    st.navigation(signed_out)


def _asked_page(pages: list[StreamlitPage]) -> str | None:
    """The page (url path) this run's request names, or None if it names none of `pages`.

    Read before `st.navigation`, which falls back to the first page when the request names none.
    """
    ctx = get_script_run_ctx()
    if ctx is None:
        return None
    intent = ctx.pages_manager
    # A page's hash is Streamlit's hash of its url path (st.Page._script_hash, private; Streamlit is pinned and
    # tests/app/test_app_navigation.py fails if this stops holding).
    by_hash = {page._script_hash: page.url_path for page in pages}
    if intent.intended_page_script_hash:
        return by_hash.get(intent.intended_page_script_hash)
    if intent.intended_page_name in by_hash.values():
        return intent.intended_page_name
    return None


def _stay_on_page(pages: list[StreamlitPage], current: StreamlitPage, asked: str | None) -> StreamlitPage:
    """Keep the browser session on its page through reruns that name no page.

    A component's answer (the sign-in cookie's reader, a grid) can rerun the script with no page in the request,
    and `st.navigation` then draws the first page: a bookmarked or deep-linked page opened as Chat, or jumped to
    Chat a moment after it was drawn (seen with chromium 156 under load). A rerun that names a page (a click in the
    sidebar, `st.switch_page`, a widget on the page) is obeyed; one that names none returns to the page this session
    was on, or, right after sign-in, to the page the visitor's address asked for (`_remember_wanted_page`).
    """
    on = st.session_state.get(PAGE_KEY)
    if asked is None and on is not None and on != current.url_path:
        target = next((page for page in pages if page.url_path == on), None)
        if target is not None:
            st.switch_page(target)  # reruns the script on that page; nothing below runs
    st.session_state[PAGE_KEY] = current.url_path
    return current


if not st.session_state.get("authentication_status"):
    _remember_wanted_page()


def _write_pending_cookie(authenticator: stauth.Authenticate) -> None:
    cookie_model = authenticator.cookie_controller.cookie_model
    if isinstance(cookie_model, StoreSessionCookie):
        cookie_model.write_pending()


user, authenticator = _signed_in_user()
if user is None:
    st.session_state.pop(USER_KEY, None)
    _write_pending_cookie(authenticator)  # a sign-out's or a dead cookie's deletion, until the browser confirms it
    _signed_out_navigation()
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
pages.append(st.Page(VIEWS / "knowledge.py", title="Knowledge", icon=":material/library_books:", url_path="knowledge"))
pages.append(st.Page(VIEWS / "analytics.py", title="Analytics", icon=":material/query_stats:", url_path="analytics"))
pages.append(st.Page(VIEWS / "dashboards.py", title="Dashboards", icon=":material/monitoring:", url_path="dashboards"))
pages.append(st.Page(VIEWS / "leaderboard.py", title="Leaderboard", icon=":material/trophy:", url_path="leaderboard"))
pages.append(st.Page(VIEWS / "reports.py", title="Reports", icon=":material/description:", url_path="reports"))
if allowed(user, "user.manage"):
    pages.append(st.Page(VIEWS / "admin.py", title="Admin", icon=":material/admin_panel_settings:", url_path="admin"))

with st.sidebar:
    st.caption(f"Signed in as **{safe_markdown(user.display_name)}** ({user.role})")
    authenticator.logout(
        "Sign out",
        location="sidebar",
        # Revokes this browser's store session (audited as `logout`): a copy of the cookie dies with it.
        callback=lambda _: sessions.end(store(), st.session_state.get(SESSION_KEY), client_addr=client_addr()),
    )
    if not st.session_state.get("authentication_status"):
        # Keep the library's `logout` flag (it stops the cookie signing the user straight back in), the mark that
        # this tab shows a navigation (now replaced) and the cookie's pending deletion; then stop rather than rerun,
        # so the cookie component can delete the cookie in the browser.
        for key in [k for k in st.session_state if k not in ("logout", NAVIGATION_KEY, PENDING_DELETE_KEY)]:
            del st.session_state[key]
    else:
        # After the sign-out button; in the sidebar, whose first elements are the same on every page, so the
        # component is not redrawn between runs.
        _write_pending_cookie(authenticator)
if not st.session_state.get("authentication_status"):  # signed out just now, by the button above
    _write_pending_cookie(authenticator)  # the cookie's deletion, in the main area as on the signed-out runs after
    _signed_out_navigation()
    st.stop()

asked = _asked_page(pages)
current = st.navigation(pages)
st.session_state[NAVIGATION_KEY] = True
current = _stay_on_page(pages, current, asked)
# A bug on a page is logged with an id and shown as one line, never as a traceback (app/failures.py).
run_page(current)
