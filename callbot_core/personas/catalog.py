"""Personas and their versions: the defaults shipped with the workbench, look-ups and new versions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from callbot_core.errors import InvalidInput, NotFound
from callbot_core.store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from callbot_core.store import Store


def parse_persona_ref(ref: str) -> tuple[str, int | None]:
    """`key` or `key@version` → (key, version or None for the latest)."""
    key, _, version = ref.partition("@")
    key = key.strip()
    if not key:
        raise InvalidInput("Persona reference is empty: give a key such as 'receptionist' or 'receptionist@2'")
    if not version:
        return key, None
    try:
        number = int(version)
    except ValueError:
        raise InvalidInput(f"Persona version {version!r} in {ref!r} is not a number") from None
    return key, number


def get_persona_version(session: Session, ref: str) -> PersonaVersion:
    """The version named by `key[@version]`; the latest version when none is given."""
    key, number = parse_persona_ref(ref)
    persona = session.scalar(select(Persona).where(Persona.key == key))
    if persona is None:
        known = ", ".join(session.scalars(select(Persona.key).order_by(Persona.key)))
        raise NotFound(f"Unknown persona {key!r}; known personas: {known or 'none (run callbot db upgrade)'}")
    query = select(PersonaVersion).where(PersonaVersion.persona_id == persona.id)
    if number is None:
        version = session.scalar(query.order_by(PersonaVersion.version.desc()).limit(1))
    else:
        version = session.scalar(query.where(PersonaVersion.version == number))
    if version is None:
        raise NotFound(f"Persona {key!r} has no version {number}")
    return version


def list_personas(session: Session) -> list[tuple[Persona, int]]:
    """Every persona with its latest version number."""
    latest = (
        select(PersonaVersion.persona_id, func.max(PersonaVersion.version).label("v"))
        .group_by(PersonaVersion.persona_id)
        .subquery()
    )
    rows = session.execute(
        select(Persona, latest.c.v).join(latest, latest.c.persona_id == Persona.id).order_by(Persona.key)
    )
    return [(p, v) for p, v in rows]


@dataclass(frozen=True)
class PersonaChoice:
    key: str
    name: str
    description: str
    versions: tuple[int, ...]

    @property
    def latest(self) -> int:
        return self.versions[-1]


def persona_catalog(store: Store) -> list[PersonaChoice]:
    """Every persona that is not archived, with its version numbers (oldest first)."""
    with store.session() as session:
        rows = session.execute(
            select(Persona.key, Persona.name, Persona.description, PersonaVersion.version)
            .join(PersonaVersion, PersonaVersion.persona_id == Persona.id)
            .where(Persona.archived.is_(False))
            .order_by(Persona.key, PersonaVersion.version)
        )
        catalog: dict[str, tuple[str, str, list[int]]] = {}
        for key, name, description, version in rows:
            catalog.setdefault(key, (name, description, []))[2].append(version)
    return [PersonaChoice(k, n, d, tuple(v)) for k, (n, d, v) in catalog.items()]


@dataclass(frozen=True)
class PersonaSummary:
    key: str
    name: str
    description: str
    latest: int
    versions: int
    production: int | None
    archived: bool


def all_personas(store: Store) -> list[PersonaSummary]:
    """Every persona, archived ones too, with its latest and production version numbers."""
    with store.session() as session:
        out = []
        for persona in session.scalars(select(Persona).order_by(Persona.key)):
            numbers = [v.version for v in persona.versions]
            production = next((v.version for v in persona.versions if v.id == persona.production_version_id), None)
            out.append(
                PersonaSummary(
                    persona.key,
                    persona.name,
                    persona.description,
                    max(numbers, default=0),
                    len(numbers),
                    production,
                    persona.archived,
                )  # fmt: skip
            )
        return out
