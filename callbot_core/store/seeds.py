"""What a fresh store starts with: the default personas, read from package data (`default_personas.yaml`)."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

import yaml
from sqlalchemy import select

from callbot_core.store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from callbot_core.store.db import Store

DEFAULTS_FILE = "default_personas.yaml"


def default_personas() -> list[dict[str, object]]:
    """The shipped default personas: key, name, description, system_prompt, greeting, temperature."""
    text = resources.files("callbot_core.store").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
    return list(yaml.safe_load(text)["personas"])


def seed_default_personas(store: Store) -> int:
    """Create the default personas that do not exist yet. Returns how many were created."""
    created = 0
    with store.session() as session:
        existing = set(session.scalars(select(Persona.key)))
        for seed in default_personas():
            if seed["key"] in existing:
                continue
            persona = Persona(key=seed["key"], name=seed["name"], description=seed["description"])
            persona.versions.append(
                PersonaVersion(
                    version=1,
                    system_prompt=seed["system_prompt"],
                    greeting=seed["greeting"],
                    temperature=float(seed.get("temperature", 0.7)),  # type: ignore[arg-type]
                    top_p=0.95,
                    max_tokens=256,
                )
            )
            session.add(persona)
            created += 1
    return created
