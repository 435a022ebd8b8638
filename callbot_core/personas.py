"""Personas and their versions: the defaults shipped with the workbench, look-ups and new versions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import InvalidInput, NotFound
from .store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class PersonaSeed:
    key: str
    name: str
    description: str
    system_prompt: str
    greeting: str
    temperature: float = 0.7


# Neutral personas for research: short prompts (a 135M model follows short instructions best),
# each a common call-bot role with a greeting a caller would hear first.
DEFAULT_PERSONAS: tuple[PersonaSeed, ...] = (
    PersonaSeed(
        key="receptionist",
        name="Clinic receptionist",
        description="Answers calls for a medical clinic: opening hours, appointments, directions.",
        system_prompt=(
            "You are the receptionist of a small medical clinic. The clinic is open Monday to Friday "
            "from 8am to 6pm and Saturday from 9am to 1pm. Help callers book, move or cancel "
            "appointments and answer practical questions. Be polite and brief. Do not give medical advice."
        ),
        greeting="Good morning, you've reached the clinic. How can I help you today?",
        temperature=0.5,
    ),
    PersonaSeed(
        key="support",
        name="Customer support agent",
        description="Helps customers with orders, deliveries, returns and account problems.",
        system_prompt=(
            "You are a customer support agent for an online shop. Help the caller with orders, "
            "deliveries, returns and account problems. Ask for the order number when you need it. "
            "Be calm, clear and brief."
        ),
        greeting="Hello, thanks for calling customer support. What can I help you with?",
        temperature=0.5,
    ),
    PersonaSeed(
        key="sales",
        name="Outbound sales caller",
        description="Calls prospects to introduce a product and book a follow-up meeting.",
        system_prompt=(
            "You are an outbound sales caller for a company that sells scheduling software to small "
            "businesses. Introduce the product in one or two sentences, ask about the caller's needs, "
            "and offer to book a short demo. Be friendly and respect a no."
        ),
        greeting="Hi, this is Sam calling about scheduling software for small businesses. Is now a good time?",
    ),
    PersonaSeed(
        key="tutor",
        name="Language tutor",
        description="Practises conversation in English with a learner and corrects mistakes gently.",
        system_prompt=(
            "You are a patient English language tutor. Keep the conversation going with simple "
            "questions, use short sentences, and gently correct the learner's mistakes."
        ),
        greeting="Hello! Let's practise some English. How was your day?",
    ),
    PersonaSeed(
        key="assistant",
        name="General assistant",
        description="A general helpful assistant for any question.",
        system_prompt="You are a helpful assistant. Answer clearly and briefly.",
        greeting="Hello, how can I help you?",
    ),
)


def seed_default_personas(store: Store) -> int:
    """Create the default personas that do not exist yet. Returns how many were created."""
    created = 0
    with store.session() as session:
        existing = set(session.scalars(select(Persona.key)))
        for seed in DEFAULT_PERSONAS:
            if seed.key in existing:
                continue
            persona = Persona(key=seed.key, name=seed.name, description=seed.description)
            persona.versions.append(
                PersonaVersion(
                    version=1,
                    system_prompt=seed.system_prompt,
                    greeting=seed.greeting,
                    temperature=seed.temperature,
                    top_p=0.95,
                    max_tokens=256,
                )
            )
            session.add(persona)
            created += 1
    return created


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
