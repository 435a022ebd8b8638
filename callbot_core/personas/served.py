"""Personas served as models, for clients that speak the OpenAI API: `key` is the persona's production version (its
latest when none carries the label), `key@N` is version N. Archived personas are not served.

The names are the ones `callbot chat --persona` takes, so a model id a client uses is a persona ref everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from callbot_core.errors import InvalidInput, NotFound
from callbot_core.personas.catalog import parse_persona_ref
from callbot_core.store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from callbot_core.store import Store

# An unknown model's error names this many served ones: enough to spot a typo, short enough for one line.
NAMED_IN_ERROR = 6


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str  # `key` or `key@N`
    ref: str  # the version it runs now, always `key@N`
    created: datetime


class UnknownModel(NotFound):
    """No served persona has this name (unknown, archived, or no such version)."""


def _served(session: Session) -> list[ServedModel]:
    rows = session.execute(
        select(Persona.key, Persona.production_version_id, PersonaVersion.id, PersonaVersion.version,
               PersonaVersion.created_at)
        .join(PersonaVersion, PersonaVersion.persona_id == Persona.id)
        .where(Persona.archived.is_(False))
        .order_by(Persona.key, PersonaVersion.version)
    )  # fmt: skip
    by_key: dict[str, list[ServedModel]] = {}
    labelled: dict[str, ServedModel] = {}
    for key, production_id, version_id, number, created in rows:
        model = ServedModel(f"{key}@{number}", f"{key}@{number}", created)
        by_key.setdefault(key, []).append(model)
        if version_id == production_id:
            labelled[key] = model
    out: list[ServedModel] = []
    for key, versions in by_key.items():
        current = labelled.get(key, versions[-1])
        out.append(ServedModel(key, current.ref, current.created))
        out.extend(versions)
    return out


def served_models(store: Store) -> list[ServedModel]:
    """Every model a client may name: each persona's key, then its versions, personas in key order."""
    with store.session() as session:
        return _served(session)


def resolve_model(session: Session, name: str) -> PersonaVersion:
    """The persona version the model `name` runs now; `UnknownModel` naming a few served ones otherwise."""
    try:
        key, number = parse_persona_ref(name)
    except InvalidInput:
        key, number = "", None
    persona = session.scalar(select(Persona).where(Persona.key == key, Persona.archived.is_(False))) if key else None
    version: PersonaVersion | None = None
    if persona is not None:
        query = select(PersonaVersion).where(PersonaVersion.persona_id == persona.id)
        if number is not None:
            version = session.scalar(query.where(PersonaVersion.version == number))
        elif persona.production_version_id is not None:
            version = session.get(PersonaVersion, persona.production_version_id)
        else:
            version = session.scalar(query.order_by(PersonaVersion.version.desc()).limit(1))
    if version is None:
        keys = [m.id for m in _served(session) if m.id == m.ref.partition("@")[0]]
        more = len(keys) - NAMED_IN_ERROR
        shown = ", ".join(keys[:NAMED_IN_ERROR]) + (f" and {more} more" if more > 0 else "")
        raise UnknownModel(
            f"Unknown model {name[:100]!r}; available: {shown or 'none'}, each also as key@version"
            " (GET /v1/models lists them all)"
        )
    return version
