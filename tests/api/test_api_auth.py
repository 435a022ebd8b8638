"""Who may call the API: tokens from a password, API keys with scopes, and nothing without one but /health."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import MAX_FAILED_LOGINS, lock, reset_password, set_role
from callbot_core.store.models import ApiKey, AuditLog
from tests.api.conftest import PASSWORD, Api


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def test_health_needs_no_credential_and_everything_else_does(api: Api) -> None:
    with api.client() as c:
        assert c.get("/health").json() == {"status": "ok", "store": "ok"}
        for method, path in (("GET", "/v1/apikeys"), ("GET", "/v1/health/backends"), ("DELETE", "/v1/auth/token")):
            r = c.request(method, path)
            assert _error(r) == (401, "unauthorized"), path
            assert r.headers["www-authenticate"] == "Bearer"
    with api.client("not-a-token") as c:
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")
    with api.client("cbk_made-up") as c:
        r = c.get("/v1/health/backends")
        assert _error(r) == (401, "unauthorized")
        assert "API key" in r.json()["error"]["message"]


def test_a_token_from_a_password_works_until_signed_out(api: Api) -> None:
    token = api.token("researcher")
    with api.client(token) as c:
        health = c.get("/v1/health/backends")
        assert health.status_code == 200
        assert "scripted" in {b["name"] for b in health.json()}
        assert c.delete("/v1/auth/token").status_code == 204
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")


@pytest.mark.both_stores
def test_a_wrong_password_gets_one_answer_and_locks_after_five(api: Api) -> None:
    name = api.user("researcher")
    with api.client() as c:
        answers = set()
        for _ in range(MAX_FAILED_LOGINS):
            r = c.post("/v1/auth/token", json={"username": name, "password": "wrong password"})
            answers.add((r.status_code, r.json()["error"]["message"]))
        unknown = c.post("/v1/auth/token", json={"username": "nobody-here", "password": "wrong password"})
        answers.add((unknown.status_code, unknown.json()["error"]["message"]))
        assert len(answers) == 1 and answers.pop()[0] == 401
        # Locked now: even the right password is refused, with the same answer.
        r = c.post("/v1/auth/token", json={"username": name, "password": PASSWORD})
        assert _error(r) == (401, "unauthorized")
    with api.store.session() as s:
        actions = [a for (a,) in s.execute(select(AuditLog.action).where(AuditLog.actor == name))]
    assert actions.count("login.failed") == MAX_FAILED_LOGINS and "login.refused" in actions


def test_a_password_change_ends_the_token(api: Api) -> None:
    token = api.token("researcher")
    reset_password(api.store, "researcher-user", "another password 1", actor=LOCAL_OPERATOR)
    with api.client(token) as c:
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")


@pytest.mark.parametrize(
    "body",
    [{}, {"username": "a"}, {"username": 5, "password": "x"}, {"username": "", "password": "x"}, [1, 2]],
)
def test_a_malformed_sign_in_is_a_422_naming_the_field(api: Api, body: object) -> None:
    with api.client() as c:
        r = c.post("/v1/auth/token", json=body)
    assert _error(r) == (422, "invalid_request")
    assert r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_invalid_json(api: Api) -> None:
    with api.client() as c:
        r = c.post("/v1/auth/token", content=b"{not json", headers={"content-type": "application/json"})
    assert _error(r) == (422, "invalid_json")


def test_a_body_over_the_limit_is_refused_before_it_is_read(api: Api) -> None:
    big = b'{"username": "' + b"a" * (api.settings.api_max_body_bytes + 10) + b'", "password": "x"}'
    with api.client() as c:
        r = c.post("/v1/auth/token", content=big, headers={"content-type": "application/json"})
        assert _error(r) == (413, "body_too_large")

        def chunks():  # no Content-Length: counted as it streams in
            yield b'{"username": "'
            for _ in range(40):
                yield b"a" * 65536
            yield b'", "password": "x"}'

        r = c.post("/v1/auth/token", content=chunks(), headers={"content-type": "application/json"})
        assert _error(r) == (413, "body_too_large")


def test_a_key_acts_as_its_user_within_its_scopes(api: Api) -> None:
    admin_read = api.key("admin", scopes="chat,read", name="boss")
    admin_full = api.key("admin", scopes="admin,read", name="boss")
    researcher_admin = api.key("researcher", scopes="admin")
    with api.client(admin_read) as c:
        r = c.get("/v1/apikeys")
        assert _error(r) == (403, "forbidden")
        assert "'admin' scope" in r.json()["error"]["message"]
    with api.client(admin_full) as c:
        listed = c.get("/v1/apikeys")
        assert listed.status_code == 200
        assert {k["name"] for k in listed.json()} == {"test"}
        assert all("key" not in k for k in listed.json())
    with api.client(researcher_admin) as c:  # a scope never widens the role
        r = c.get("/v1/apikeys")
        assert _error(r) == (403, "forbidden")
        assert "researcher-user (researcher) may not" in r.json()["error"]["message"]


def test_a_key_is_shown_once_stored_as_a_hash_and_its_use_is_kept_to_the_minute(api: Api) -> None:
    key = api.key("researcher")
    with api.client(key) as c:
        for _ in range(3):
            assert c.get("/v1/health/backends").status_code == 200
    with api.store.session() as s:
        rows = list(s.scalars(select(ApiKey)))
    assert len(rows) == 1
    assert key not in {rows[0].key_hash, rows[0].prefix} and key.startswith(rows[0].prefix)
    first_use = rows[0].last_used_at
    assert first_use is not None
    with api.client(key) as c:  # within the minute: no write
        assert c.get("/v1/health/backends").status_code == 200
    with api.store.session() as s:
        assert s.scalar(select(ApiKey.last_used_at)) == first_use


@pytest.mark.both_stores
def test_revoked_expired_and_locked_keys_are_refused_at_once(api: Api) -> None:
    admin = api.key("admin", scopes="admin", name="boss")
    victim = api.key("researcher")
    short = apikeys.create_key(api.store, "researcher-user", "short", actor=LOCAL_OPERATOR,
                               expires_in=timedelta(minutes=1)).key  # fmt: skip
    with api.client(victim) as c:
        assert c.get("/v1/health/backends").status_code == 200
    with api.client(admin) as c:
        victim_id = next(k["id"] for k in c.get("/v1/apikeys").json() if k["name"] == "test")
        assert c.delete(f"/v1/apikeys/{victim_id}").status_code == 204
        assert _error(c.delete("/v1/apikeys/99999")) == (404, "not_found")
        states = {k["id"]: k["state"] for k in c.get("/v1/apikeys").json()}
        assert states[victim_id] == "revoked"
    with api.client(victim) as c:
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")
    # Expired: move its end into the past.
    with api.store.session() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.name == "short"))
        row.expires_at = row.created_at - timedelta(seconds=1)
    with api.client(short) as c:
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")
    # A role change applies to a key at once; an admin's lock stops it.
    other = api.key("researcher", name="carol")
    set_role(api.store, "carol", "viewer", actor=LOCAL_OPERATOR)
    with api.client(other) as c:
        assert c.get("/v1/health/backends").status_code == 200
    lock(api.store, "carol", actor=LOCAL_OPERATOR)
    with api.client(other) as c:
        assert _error(c.get("/v1/health/backends")) == (401, "unauthorized")


def test_an_admin_makes_a_key_over_the_api(api: Api) -> None:
    admin = api.key("admin", scopes="admin", name="boss")
    api.user("researcher")
    with api.client(admin) as c:
        r = c.post("/v1/apikeys", json={"username": "researcher-user", "name": "lab", "scopes": ["chat"],
                                        "expires": "90d"})  # fmt: skip
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["key"].startswith("cbk_") and made["scopes"] == ["chat"] and made["expires_at"]
        for bad, code in (
            ({"username": "researcher-user", "name": "x", "scopes": ["root"]}, "invalid_input"),
            ({"username": "researcher-user", "name": "x", "expires": "soon"}, "invalid_input"),
            ({"username": "ghost", "name": "x"}, "not_found"),
            ({"username": "researcher-user", "name": "  "}, "invalid_input"),
        ):
            r = c.post("/v1/apikeys", json=bad)
            assert r.json()["error"]["code"] == code, (bad, r.text)
    with api.client(made["key"]) as c:
        assert c.get("/v1/health/backends").status_code == 200


def test_every_response_carries_a_request_id(api: Api) -> None:
    with api.client() as c:
        assert len(c.get("/health").headers["x-request-id"]) == 16
        assert c.get("/health", headers={"X-Request-ID": "call-42"}).headers["x-request-id"] == "call-42"
        assert c.get("/nope").headers["x-request-id"]
        assert _error(c.get("/nope")) == (404, "not_found")
