"""Knowledge over HTTP with a real client: uploads (multipart), listing, search, deletion, evaluations, citations in a
turn, and the errors: bad files, all refused, unknown collection, a viewer, a too-large upload."""

from __future__ import annotations

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.personas.versions import save_version
from callbot_core.settings import Settings
from tests.api.conftest import Api
from tests.knowledge.conftest import CLINIC_TEXTS, bow  # noqa: F401  (the fake embedder fixture)

pytestmark = pytest.mark.usefixtures("bow")


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"llm_backend": "scripted", "embedder": "test-bow", "api_max_upload_bytes": 200_000}
    )


def _files(*names: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (n, CLINIC_TEXTS[n].encode(), "text/plain")) for n in names]


def _upload(api: Api, key: str) -> dict:
    with api.client(key) as c:
        r = c.post("/v1/knowledge/clinic/documents", files=_files("hours.md", "fees.txt", "parking.txt"))
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_list_search_delete(api: Api) -> None:
    key = api.key()
    body = _upload(api, key)
    assert body["refused"] == 0 and [f["status"] for f in body["files"]] == ["ingested"] * 3
    with api.client(key) as c:
        again = c.post("/v1/knowledge/clinic/documents", files=_files("fees.txt")).json()
        assert again["files"][0]["status"] == "unchanged"
        docs = c.get("/v1/knowledge/clinic/documents").json()
        assert [d["source"] for d in docs] == ["fees.txt", "hours.md", "parking.txt"]
        [collection] = c.get("/v1/knowledge").json()
        assert collection["name"] == "clinic" and collection["documents"] == 3 and collection["embedder"] == "test-bow"

        hits = c.post("/v1/knowledge/clinic/search", json={"question": "Open on Saturday?", "k": 2}).json()
        assert hits["hits"][0]["source"] == "hours.md" and hits["hits"][0]["rank"] == 1
        assert 0 <= hits["hits"][0]["similarity"] <= 1 and hits["low_relevance"] is False

        r = c.delete("/v1/knowledge/clinic/documents/parking.txt")
        assert r.status_code == 200 and r.json()["source"] == "parking.txt"
        missing = c.delete("/v1/knowledge/clinic/documents/parking.txt")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert c.delete("/v1/knowledge/clinic").status_code == 204
        assert c.get("/v1/knowledge").json() == []


def test_bad_files_are_listed_and_all_bad_is_a_422(api: Api) -> None:
    key = api.key()
    with api.client(key) as c:
        mixed = c.post(
            "/v1/knowledge/kb/documents",
            files=[("files", ("good.txt", b"The lift is by the stairs.", "text/plain")),
                   ("files", ("fake.pdf", b"\xff\xd8\xff\xe0JFIF" + b"\0" * 32, "application/pdf"))],
        )  # fmt: skip
        assert mixed.status_code == 200
        body = mixed.json()
        assert body["refused"] == 1 and body["files"][1]["error"].startswith("fake.pdf: ")
        only_bad = c.post("/v1/knowledge/kb/documents", files=[("files", ("empty.txt", b"", "text/plain"))])
        assert only_bad.status_code == 422
        assert only_bad.json()["error"] == {"code": "invalid_input", "message": "empty.txt: empty file"}
        assert [d["source"] for d in c.get("/v1/knowledge/kb/documents").json()] == ["good.txt"]

        too_big = c.post("/v1/knowledge/kb/documents", files=[("files", ("big.txt", b"x " * 150_000, "text/plain"))])
        assert too_big.status_code == 413 and "CALLBOT_API_MAX_UPLOAD_BYTES" in too_big.json()["error"]["message"]


def test_errors_and_permissions(api: Api) -> None:
    _upload(api, api.key())
    viewer = api.key(role="viewer", scopes="read")
    with api.client(viewer) as c:
        assert c.post("/v1/knowledge/clinic/search", json={"question": "hours"}).status_code == 200
        refused = c.post("/v1/knowledge/clinic/documents", files=_files("fees.txt"))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert c.post("/v1/knowledge/nope/search", json={"question": "hours"}).status_code == 404
        assert c.post("/v1/knowledge/clinic/search", json={"question": ""}).status_code == 422
        assert c.post("/v1/knowledge/clinic/search", json={"question": "x", "k": 0}).status_code == 422
        assert c.post("/v1/knowledge/Bad%20Name/search", json={"question": "x"}).status_code == 422
    with api.client() as anonymous:
        assert anonymous.get("/v1/knowledge").status_code == 401


def test_evaluation_over_http(api: Api) -> None:
    key = api.key()
    _upload(api, key)
    questions = [{"question": "Is the clinic open on Saturday?", "expected_sources": ["hours.md"]},
                 {"question": "dividend forecast stock", "expected_sources": []}]  # fmt: skip
    with api.client(key) as c:
        r = c.post("/v1/knowledge/clinic/evals", json={"questions": questions, "k": 3, "threshold": 0.3})
        assert r.status_code == 201, r.text
        run = r.json()
        assert run["recall_at_k"] == 1.0 and run["unanswerable"] == 1 and run["questions_file"] == "api"
        assert [e["id"] for e in c.get("/v1/knowledge-evals", params={"collection": "clinic"}).json()] == [run["id"]]
        assert c.post("/v1/knowledge/clinic/evals", json={"questions": []}).status_code == 422


def test_a_turn_over_http_carries_its_citations(api: Api) -> None:
    key = api.key()
    _upload(api, key)
    save_version(api.store, "receptionist", {"knowledge_collection": "clinic", "knowledge_k": 2}, actor=LOCAL_OPERATOR)
    with api.client(key) as c:
        conversation = c.post("/v1/conversations", json={"persona": "receptionist"}).json()
        turn = c.post(f"/v1/conversations/{conversation['id']}/turns", json={"text": "Open on Saturday?"}).json()
    assert turn["low_relevance"] is False
    assert turn["citations"][0]["number"] == 1 and turn["citations"][0]["source"] == "hours.md"
    assert "Saturday" in turn["citations"][0]["text"]


def test_semantic_search_over_http(api: Api) -> None:
    key = api.key()
    with api.client(key) as c:
        conversation = c.post("/v1/conversations", json={"persona": "receptionist"}).json()
        c.post(f"/v1/conversations/{conversation['id']}/turns", json={"text": "I must cancel my dentist appointment"})
        hits = c.get("/v1/conversations/semantic-search", params={"q": "cancel appointment", "limit": 3}).json()
        assert hits[0]["conversation_id"] == conversation["id"] and "dentist" in hits[0]["text"]
        assert 0 <= hits[0]["similarity"] <= 1
        assert c.get("/v1/conversations/semantic-search", params={"q": ""}).status_code == 422


def test_backends_health_includes_the_vector_store(api: Api) -> None:
    with api.client(api.key()) as c:
        health = {b["name"]: b for b in c.get("/v1/health/backends").json()}
    assert health["vectors.chroma"]["ok"] is True
    assert health["vectors.chroma"]["where"].endswith("chroma")  # the embedded folder under the runtime dir
