"""Personas over HTTP: the catalogue, one persona's versions and production label, cards out and in."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.personas.versions import archive_persona, save_version, set_production
from callbot_core.store.models import AuditLog, Persona, PersonaVersion
from tests.api.conftest import Api


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def _versions(api: Api) -> int:
    with api.store.session() as s:
        return s.scalar(select(func.count()).select_from(PersonaVersion)) or 0


def test_the_catalogue_lists_personas_with_latest_and_production(api: Api) -> None:
    save_version(api.store, "receptionist", {"temperature": 0.3}, actor=LOCAL_OPERATOR, note="cooler")
    set_production(api.store, "receptionist@1", actor=LOCAL_OPERATOR)
    archive_persona(api.store, "support", actor=LOCAL_OPERATOR)
    with api.client(api.key("viewer", scopes="read")) as c:
        listed = {p["key"]: p for p in c.get("/v1/personas").json()}
        assert "support" not in listed
        assert listed["receptionist"]["latest"] == 2 and listed["receptionist"]["versions"] == 2
        assert listed["receptionist"]["production"] == 1 and listed["receptionist"]["archived"] is False
        everything = {p["key"] for p in c.get("/v1/personas", params={"archived": "true"}).json()}
        assert everything == set(listed) | {"support"}

        one = c.get("/v1/personas/receptionist").json()
        assert one["production"] == 1 and [v["version"] for v in one["versions"]] == [1, 2]
        assert one["versions"][1]["temperature"] == 0.3 and one["versions"][1]["note"] == "cooler"
        assert one["versions"][0]["production"] is True and one["versions"][1]["production"] is False
        assert c.get("/v1/personas/receptionist@1/version").json()["ref"] == "receptionist@1"
        assert c.get("/v1/personas/receptionist/version").json()["version"] == 2

        assert _error(c.get("/v1/personas/nobody")) == (404, "not_found")
        assert _error(c.get("/v1/personas/receptionist@9/card")) == (404, "not_found")
        assert _error(c.get("/v1/personas/receptionist@x/card")) == (422, "invalid_request")
        assert _error(c.get("/v1/personas/receptionist@2147483648/card")) == (422, "invalid_request")
        assert _error(c.get("/v1/personas/@1/card")) == (422, "invalid_input")
        assert _error(c.get("/v1/personas/" + "k" * 65)) == (422, "invalid_request")


def test_a_card_goes_out_and_comes_back_as_a_new_version(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        card = c.get("/v1/personas/receptionist@1/card").json()
        assert card["spec"] == "chara_card_v2" and card["data"]["extensions"]["callbot"]["key"] == "receptionist"
        changed = copy.deepcopy(card)
        changed["data"]["system_prompt"] = "You answer the phone briefly."
        r = c.post("/v1/personas/import", json=changed)
        assert r.status_code == 201, r.text
        assert r.json()["ref"] == "receptionist@2" and r.json()["system_prompt"] == "You answer the phone briefly."

        r = c.post("/v1/personas/import", json=card, params={"key": "front-desk"})
        assert r.status_code == 201 and r.json()["ref"] == "front-desk@1"
        assert {p["key"] for p in c.get("/v1/personas").json()} >= {"front-desk", "receptionist"}
    with api.store.session() as s:
        created = list(s.scalars(select(AuditLog.target).where(AuditLog.action == "persona.create")))
    assert created == ["front-desk@1"]


BAD_CARDS = [
    pytest.param({"spec": "other"}, "spec must be 'chara_card_v2'", id="wrong-spec"),
    pytest.param({"spec": "chara_card_v2", "spec_version": "2.0"}, "data is missing", id="no-data"),
    pytest.param({"spec": "chara_card_v2", "data": {"name": ""}}, "data.name", id="no-name"),
    pytest.param({"spec": "chara_card_v2", "data": {"name": "X", "tags": "a"}}, "data.tags", id="tags-not-list"),
    pytest.param({"spec": "chara_card_v2", "data": {"name": "X"}}, "system_prompt is empty", id="no-prompt"),
    pytest.param(
        {
            "spec": "chara_card_v2",
            "data": {"name": "X", "system_prompt": "Hi", "extensions": {"callbot": {"temperature": 9}}},
        },  # fmt: skip
        "data.extensions.callbot.temperature",
        id="temperature-out-of-range",
    ),
    pytest.param(
        {"spec": "chara_card_v2", "data": {"name": "X\u0000", "system_prompt": "Hi"}}, "card.data.name", id="nul"
    ),  # fmt: skip
    pytest.param(
        {"spec": "chara_card_v2", "data": {"name": "X" * 201, "system_prompt": "Hi"}},
        "data.name is too long",
        id="long-name",
    ),
    pytest.param(
        {
            "spec": "chara_card_v2",
            "data": {"name": "X", "system_prompt": "Hi", "extensions": {"callbot": {"backend": "b" * 41}}},
        },  # fmt: skip
        "data.extensions.callbot.backend is too long",
        id="long-backend",
    ),
]


@pytest.mark.parametrize(("card", "named"), BAD_CARDS)
def test_a_bad_card_is_a_422_naming_what_and_stores_nothing(api: Api, card: dict[str, Any], named: str) -> None:
    before = _versions(api)
    with api.client(api.key("researcher")) as c:
        r = c.post("/v1/personas/import", json=card)
    assert _error(r) == (422, "invalid_input"), r.text
    assert named in r.json()["error"]["message"]
    assert _versions(api) == before


def test_importing_needs_a_role_and_a_key_that_may_edit_personas(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        card = c.get("/v1/personas/receptionist/card").json()
    card["data"]["extensions"]["callbot"]["key"] = "copy"
    for key in (api.key("viewer"), api.key("researcher", scopes="read", name="reader")):
        with api.client(key) as c:
            assert _error(c.post("/v1/personas/import", json=card)) == (403, "forbidden")
    with api.client(api.key("researcher")) as c:
        assert _error(c.post("/v1/personas/import", json=[1, 2])) == (422, "invalid_request")
        assert _error(c.post("/v1/personas/import", json=card, params={"key": "Bad Key"})) == (422, "invalid_input")
    with api.store.session() as s:
        assert s.scalar(select(Persona.id).where(Persona.key == "copy")) is None
