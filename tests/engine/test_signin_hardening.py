"""Sign-in hardening on SQLite and PostgreSQL: lockout under parallel guesses, a lockout that is not a denial of
service (expiry resets the count, same answer and time as a wrong password, open sessions kept), per-client
throttling, over-long names, passwords with spaces, and sessions that every change of the account can end."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import bcrypt
import pytest
from sqlalchemy import select, update

from callbot_core.access import sessions, signin
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import (
    MAX_FAILED_LOGINS,
    authenticate,
    create_user,
    get_user_info,
    reset_password,
    set_role,
    unlock,
)
from callbot_core.errors import InvalidInput
from callbot_core.store import Store
from callbot_core.store.models import AuditLog, User, UserSession, utcnow

PW = "long-enough-1"


def _actions(store: Store, actor: str) -> Counter[str]:
    with store.session() as session:
        return Counter(session.scalars(select(AuditLog.action).where(AuditLog.actor == actor)))


def _lock_by_guessing(store: Store, username: str) -> None:
    for _ in range(MAX_FAILED_LOGINS):
        assert authenticate(store, username, "wrong-wrong") is None
    assert signin.is_locked(get_user_info(store, username))


# -- lockout ---------------------------------------------------------------------------------------------------------


def test_parallel_wrong_guesses_lock_the_account_after_the_fifth(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    guesses = 20
    start = threading.Barrier(guesses)

    def guess(_: int) -> object:
        start.wait()
        return authenticate(store, "rita", "wrong-wrong")

    with ThreadPoolExecutor(max_workers=guesses) as pool:
        results = list(pool.map(guess, range(guesses)))
    assert results == [None] * guesses
    rita = get_user_info(store, "rita")
    assert rita.failed_logins == MAX_FAILED_LOGINS and signin.is_locked(rita)
    actions = _actions(store, "rita")
    # Every guess is in the log exactly once: five counted failures (the fifth locks), the rest refused as locked.
    assert actions["login.failed"] == MAX_FAILED_LOGINS
    assert actions["user.locked"] == 1
    assert actions["login.refused"] == guesses - MAX_FAILED_LOGINS
    with store.session() as session:
        counts = [
            e["failed_logins"]
            for e in session.scalars(select(AuditLog.detail).where(AuditLog.action == "login.failed"))
        ]
    assert sorted(counts) == list(range(1, MAX_FAILED_LOGINS + 1))
    # The right password is refused while the lock lasts.
    assert authenticate(store, "rita", PW) is None
    assert _actions(store, "rita")["login.refused"] == guesses - MAX_FAILED_LOGINS + 1


def test_a_lock_that_ran_out_starts_the_count_again(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    _lock_by_guessing(store, "rita")
    with store.session() as session:  # fifteen minutes later
        session.execute(
            update(User).where(User.username == "rita").values(locked_until=utcnow() - timedelta(seconds=1))
        )
    assert authenticate(store, "rita", "wrong-again") is None
    rita = get_user_info(store, "rita")
    assert rita.failed_logins == 1 and not signin.is_locked(rita)
    assert authenticate(store, "rita", PW) is not None


def test_a_locked_account_answers_as_a_wrong_password_does(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    _lock_by_guessing(store, "rita")
    # The same answer as a wrong password (no exception, no other message), even for the right password...
    assert authenticate(store, "rita", PW) is None
    assert authenticate(store, "rita", "wrong-wrong") is None
    # ...while the audit log keeps the real reason.
    with store.session() as session:
        reasons = [
            d["reason"] for d in session.scalars(select(AuditLog.detail).where(AuditLog.action == "login.refused"))
        ]
    assert reasons == ["locked", "locked"]


def _timed(fn: object, *args: object) -> float:
    t0 = time.perf_counter()
    with contextlib.suppress(Exception):  # what it answers is another test's business; here only how long it takes
        fn(*args)  # type: ignore[operator]
    return time.perf_counter() - t0


def test_a_locked_account_answers_in_the_time_a_wrong_password_takes(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    # A costly hash (as in production), so the password check dominates both timings.
    costly = bcrypt.hashpw(PW.encode(), bcrypt.gensalt(10)).decode()
    with store.session() as session:
        session.execute(update(User).where(User.username == "rita").values(password_hash=costly))
    wrong = [_timed(authenticate, store, "rita", "wrong-wrong") for _ in range(MAX_FAILED_LOGINS)]
    assert signin.is_locked(get_user_info(store, "rita"))
    locked = [_timed(authenticate, store, "rita", PW) for _ in range(3)]
    ratio = statistics.median(locked) / statistics.median(wrong)
    assert ratio > 0.5, (
        f"locked {statistics.median(locked) * 1000:.1f} ms vs wrong {statistics.median(wrong) * 1000:.1f} ms"
    )


def test_a_lockout_keeps_the_sessions_already_open(store: Store) -> None:
    rita = create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    open_session = sessions.start(store, rita)
    _lock_by_guessing(store, "rita")
    assert sessions.user_for(store, open_session.token) == get_user_info(store, "rita")
    # New sign-ins are what the lock stops.
    assert authenticate(store, "rita", PW) is None


def test_one_client_guessing_across_accounts_is_throttled(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    attacker, colleague = "203.0.113.7", "198.51.100.2"
    # Spread over many names, so no single account locks: only the per-client limit can stop this.
    for i in range(signin.CLIENT_MAX_FAILURES):
        assert authenticate(store, f"guess{i}", "wrong-wrong", client_addr=attacker) is None
    assert authenticate(store, "rita", PW, client_addr=attacker) is None  # right password, refused all the same
    with store.session() as session:
        last = session.scalars(select(AuditLog).order_by(AuditLog.id.desc())).first()
    assert last is not None and (last.action, last.actor, last.client_addr) == ("login.throttled", "rita", attacker)
    assert authenticate(store, "rita", PW, client_addr=colleague) is not None
    assert get_user_info(store, "rita").failed_logins == 0  # a throttled attempt never counts against the account
    # The window slides: once the failures are older than it, the client may try again.
    monkeypatch.setattr(signin, "CLIENT_WINDOW", timedelta(0))
    assert authenticate(store, "rita", PW, client_addr=attacker) is not None


# -- what the form may send -------------------------------------------------------------------------------------------


def test_an_over_long_name_is_a_plain_refusal(store: Store) -> None:
    name = "n" * 80  # longer than the 64-character audit and user columns
    assert authenticate(store, name, PW, client_addr="192.0.2.1" * 10) is None
    with store.session() as session:
        row = session.scalars(select(AuditLog).where(AuditLog.action == "login.failed")).one()
    assert row.actor == name[:64] and row.detail == {"reason": "unknown user"}


def test_spaces_around_a_password_are_part_of_it(store: Store) -> None:
    spaced = "  pass word  "
    create_user(store, "rita", spaced, actor=LOCAL_OPERATOR)
    assert authenticate(store, "  Rita ", spaced) is not None  # the name is trimmed and case-insensitive...
    assert authenticate(store, "rita", spaced.strip()) is None  # ...the password is taken as typed
    reset_password(store, "rita", "  other pass ", actor=LOCAL_OPERATOR)
    assert authenticate(store, "rita", "  other pass ") is not None
    assert authenticate(store, "rita", "other pass") is None


# -- sessions ---------------------------------------------------------------------------------------------------------


def _signed_in(store: Store, username: str) -> sessions.NewSession:
    user = authenticate(store, username, PW, client_addr="127.0.0.1")
    assert user is not None
    return sessions.start(store, user, client_addr="127.0.0.1")


def test_a_session_stores_only_a_digest_of_its_token(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    live = _signed_in(store, "rita")
    assert sessions.user_for(store, live.token).username == "rita"  # type: ignore[union-attr]
    with store.session() as session:
        row = session.scalars(select(UserSession)).one()
    assert live.token not in row.token_hash and row.client_addr == "127.0.0.1"
    assert row.expires_at - row.created_at == sessions.SESSION_TTL
    assert sessions.user_for(store, live.token + "x") is None and sessions.user_for(store, None) is None


def test_sign_out_ends_that_session_only(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    laptop, phone = _signed_in(store, "rita"), _signed_in(store, "rita")
    assert sessions.end(store, laptop.token, client_addr="127.0.0.1") is True
    assert sessions.user_for(store, laptop.token) is None
    assert sessions.user_for(store, phone.token) is not None
    assert sessions.end(store, laptop.token) is False  # already ended: nothing to do, nothing logged twice
    assert _actions(store, "rita")["logout"] == 1


def test_an_expired_session_is_no_session(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    live = _signed_in(store, "rita")
    with store.session() as session:
        session.execute(update(UserSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert sessions.user_for(store, live.token) is None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: reset_password(s, "rita", "brand-new-pass", actor=LOCAL_OPERATOR), id="password reset"),
        pytest.param(lambda s: set_role(s, "rita", "viewer", actor=LOCAL_OPERATOR), id="role change"),
        pytest.param(lambda s: signin.lock(s, "rita", actor=LOCAL_OPERATOR), id="admin lock"),
        pytest.param(lambda s: signin.delete_user(s, "rita", actor=LOCAL_OPERATOR), id="delete"),
    ],
)
def test_changes_to_an_account_end_all_its_sessions(store: Store, change: object) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    create_user(store, "vera", PW, role="viewer", actor=LOCAL_OPERATOR)
    ritas = [_signed_in(store, "rita"), _signed_in(store, "rita")]
    veras = _signed_in(store, "vera")
    change(store)  # type: ignore[operator]
    assert [sessions.user_for(store, s.token) for s in ritas] == [None, None]
    assert sessions.user_for(store, veras.token) is not None  # another user's session is untouched


def test_an_admin_lock_lasts_until_unlocked(store: Store) -> None:
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    signin.lock(store, "rita", actor=LOCAL_OPERATOR)
    assert authenticate(store, "rita", PW) is None
    assert get_user_info(store, "rita").locked_until > utcnow() + timedelta(days=365 * 50)  # type: ignore[operator]
    unlock(store, "rita", actor=LOCAL_OPERATOR)
    assert authenticate(store, "rita", PW) is not None


def test_deleting_a_user_removes_their_session_rows(store: Store) -> None:
    admin = create_user(store, "ada", PW, role="admin", actor=LOCAL_OPERATOR)
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    _signed_in(store, "rita")
    signin.delete_user(store, "Rita", actor=admin)
    with store.session() as session:
        assert session.scalars(select(UserSession)).all() == []
    with pytest.raises(InvalidInput, match="your own account"):
        signin.delete_user(store, "ada", actor=admin)
