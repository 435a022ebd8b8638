"""schemathesis fuzzes every operation of the live API's OpenAPI schema: no input may cause a server error, and every
response must match what the schema says (status code, content type, body, headers).

Signed in with an admin key that holds every scope, so the fuzzing reaches the routes' own checks rather than
stopping at 401. Left out of the fuzzing, and tested by hand elsewhere: starting report and suite runs (a valid
generated request would start real notebook and model work) and revoking API keys (a generated id may be the
fuzzer's own key, which would turn the rest of the run into 401s).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import create_user
from callbot_core.api import create_app
from callbot_core.backends.llm import llm_backends
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store
from tests.api.conftest import PASSWORD, LiveServer
from tests.engine.scripted import Scripted

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=f"sqlite:///{tmp / 'fuzz.db'}",
        runtime_dir=tmp / "runtime",
        llm_backend="scripted",
        # The fuzzer sends hundreds of requests a minute from one address: limits would answer most of them.
        rate_limit_signin_per_client=0,
        rate_limit_chat_per_client=0,
        rate_limit_chat_per_key=0,
        rate_limit_keys_per_client=0,
        rate_limit_keys_per_key=0,
    )
    store = Store(settings_.resolved_database_url())
    store.upgrade()
    from callbot_core.store.seeds import seed_default_personas

    seed_default_personas(store)
    create_user(store, "fuzzer", PASSWORD, role="admin", actor=LOCAL_OPERATOR)
    key = apikeys.create_key(store, "fuzzer", "fuzz", actor=LOCAL_OPERATOR, scopes="chat,read,admin").key
    fake = Scripted()
    llm_backends.register("scripted", lambda s: fake)
    service = ConversationService(store, settings_)
    info = service.start("receptionist", actor=LOCAL_OPERATOR)  # something for the id-taking routes to find
    with service.send(info.id, "Hello there", actor=LOCAL_OPERATOR) as turn:
        turn.text()
    server = LiveServer(create_app(settings_, store=store, service=service)).start()
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        schema = schema.exclude(method="POST", path_regex=r"^/v1/(reports|evals)/runs$")
        schema = schema.exclude(method="DELETE", path="/v1/apikeys/{key_id}")
        yield schema, key
    finally:
        server.stop()
        llm_backends.unregister("scripted")
        store.dispose()


def test_no_input_breaks_the_server_or_the_schema(fuzzed: tuple[schemathesis.BaseSchema, str]) -> None:
    # schemathesis' own pytest plugin (from_fixture) does not run under this pytest; each operation's strategy is
    # driven by hypothesis here instead, and every operation is fuzzed before the failures are reported together.
    schema, key = fuzzed
    headers = {"Authorization": f"Bearer {key}"}
    failures: dict[str, str] = {}
    calls: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]

    def fuzzer(operation: APIOperation):  # type: ignore[no-untyped-def]
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case: schemathesis.Case) -> None:
            calls[operation.label] = calls.get(operation.label, 0) + 1
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

        return fuzz

    for operation in operations:
        try:
            fuzzer(operation)()
        except Exception as exc:  # one operation's failure must not hide the others'
            failures[operation.label] = str(exc)[:2000]
    # Every operation was really called, most of them many times (an operation without parameters needs few).
    assert set(calls) == {op.label for op in operations}
    assert sum(calls.values()) >= 8 * len(operations), calls
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
