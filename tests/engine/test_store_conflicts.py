"""Two sessions saving the same key at the same moment: the loser hears one line, never a driver's traceback."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.errors import Conflict, Duplicate
from callbot_core.personas.versions import create_persona
from callbot_core.store.models import Persona


def test_a_unique_violation_is_a_duplicate_naming_table_and_key(store) -> None:
    with store.session() as session:
        session.add(Persona(key="twin", name="Twin"))
    with pytest.raises(Duplicate) as info, store.session() as session:
        session.add(Persona(key="twin", name="Twin again"))
    message = str(info.value)
    assert message.startswith("Not saved: personas already has a row with the same key ")
    assert "\n" not in message and "IntegrityError" not in message
    with store.session() as session:  # nothing half-stored: the first row only
        assert session.scalars(select(Persona.name).where(Persona.key == "twin")).all() == ["Twin"]


def test_concurrent_creates_of_one_key_store_one_and_refuse_the_rest_in_one_line(store) -> None:
    barrier = threading.Barrier(6)
    outcomes: list[object] = []

    def create() -> None:
        barrier.wait()
        try:
            create_persona(store, "racer", "Racer", system_prompt="You race.", actor=LOCAL_OPERATOR)
            outcomes.append("stored")
        except Exception as exc:  # noqa: BLE001 - what was raised is the point
            outcomes.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("stored") == 1
    refused = [o for o in outcomes if o != "stored"]
    assert refused and all(isinstance(o, Conflict) for o in refused), refused
    with store.session() as session:
        assert len(session.scalars(select(Persona.id).where(Persona.key == "racer")).all()) == 1
