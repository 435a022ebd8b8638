"""`callbot user passwd | unlock | lock | delete`: in-process on SQLite and PostgreSQL (the prompt needs click's
runner), and once as a real subprocess for the one-line errors."""

from __future__ import annotations

from sqlalchemy import update

from callbot_core.access import sessions
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import (
    LOCK_DURATION,
    MAX_FAILED_LOGINS,
    authenticate,
    create_user,
    get_user_info,
    is_locked,
)
from callbot_core.store import Store
from callbot_core.store.models import User, utcnow

PW = "long-enough-1"


def _session(store: Store, username: str) -> str:
    user = authenticate(store, username, PW)
    assert user is not None
    return sessions.start(store, user).token


def test_unlock_lets_a_locked_user_sign_in_again(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    with store.session() as session:  # as five wrong passwords leave it
        session.execute(
            update(User)
            .where(User.username == "rita")
            .values(failed_logins=MAX_FAILED_LOGINS, locked_until=utcnow() + LOCK_DURATION)
        )
    assert is_locked(get_user_info(store, "rita"))
    result = callbot("user", "unlock", "Rita")
    assert result.exit_code == 0, result.output
    assert "'rita' unlocked" in result.output
    rita = get_user_info(store, "rita")
    assert not is_locked(rita) and rita.failed_logins == 0
    assert authenticate(store, "rita", PW) is not None


def test_passwd_prompts_twice_without_echo_and_ends_sessions(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    token = _session(store, "rita")
    new = "  new pass word  "  # spaces at either end are part of it, as at sign-in
    mismatch = callbot("user", "passwd", "rita", input="first-try-1\nsecond-try\n")
    assert mismatch.exit_code != 0 and "do not match" in mismatch.output
    assert authenticate(store, "rita", PW) is not None  # nothing changed
    result = callbot("user", "passwd", "rita", input=f"{new}\n{new}\n")
    assert result.exit_code == 0, result.output
    assert new.strip() not in result.output  # the hidden prompt never shows it
    assert authenticate(store, "rita", new) is not None
    assert authenticate(store, "rita", new.strip()) is None
    assert sessions.user_for(store, token) is None


def test_passwd_reads_stdin_and_never_takes_the_password_as_an_argument(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    refused = callbot("user", "passwd", "rita", "on-the-command-line")
    assert refused.exit_code == 2 and "unexpected extra argument" in refused.output.lower()
    assert callbot("user", "passwd", "rita", "--password", "on-the-command-line").exit_code == 2
    assert authenticate(store, "rita", PW) is not None
    result = callbot("user", "passwd", "rita", "--password-stdin", input="from-stdin-pass \n")
    assert result.exit_code == 0, result.output
    assert authenticate(store, "rita", "from-stdin-pass ") is not None


def test_lock_ends_sessions_until_unlocked(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    token = _session(store, "rita")
    assert callbot("user", "lock", "rita").exit_code == 0
    assert sessions.user_for(store, token) is None
    assert authenticate(store, "rita", PW) is None
    assert callbot("user", "unlock", "rita").exit_code == 0
    assert authenticate(store, "rita", PW) is not None


def test_delete_asks_first_ends_sessions_and_keeps_the_last_admin(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    token = _session(store, "rita")
    declined = callbot("user", "delete", "rita", input="n\n")
    assert declined.exit_code == 1 and "Delete user 'rita'?" in declined.output
    assert sessions.user_for(store, token) is not None  # nothing happened
    deleted = callbot("user", "delete", "rita", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert "User 'rita' deleted; their open sessions have ended." in deleted.output
    assert sessions.user_for(store, token) is None
    assert "Unknown user 'rita'" in str(callbot("user", "delete", "rita", "--yes").exception)
    # The store has no other admin: the only one stays.
    create_user(store, "solo", PW, role="admin", actor=LOCAL_OPERATOR)
    refused = callbot("user", "delete", "solo", "--yes")
    assert "The last admin cannot be deleted" in str(refused.exception)
    assert get_user_info(store, "solo").role == "admin"


def test_only_admins_manage_users_from_the_command_line(store: Store, callbot) -> None:  # type: ignore[no-untyped-def]
    create_user(store, "rita", PW, actor=LOCAL_OPERATOR)
    create_user(store, "vera", PW, role="viewer", actor=LOCAL_OPERATOR)
    for args in (
        ["unlock", "rita"],
        ["lock", "rita"],
        ["passwd", "rita", "--password-stdin"],
        ["delete", "rita", "--yes"],
    ):
        result = callbot("--as", "vera", "user", *args, input="some-new-pass\n")
        assert "may not manage users" in str(result.exception)
    assert authenticate(store, "rita", PW) is not None


def test_user_errors_are_one_line(run) -> None:  # type: ignore[no-untyped-def]
    run("db", "upgrade")
    unknown = run("user", "unlock", "nobody", ok=False)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "Error: Unknown user 'nobody'"
    run("user", "add", "rita", "--password-stdin", input=f"{PW}\n")
    short = run("user", "passwd", "rita", "--password-stdin", input="short\n", ok=False)
    assert short.returncode == 1 and short.stderr.count("\n") == 1 and "too short" in short.stderr
    assert "set; their open sessions have ended" in run("user", "passwd", "rita", "--password-stdin",
                                                        input="another-pass-1\n").stdout  # fmt: skip
