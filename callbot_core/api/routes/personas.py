"""Personas and their versions: the catalogue, one persona's versions with its production label, a version as a
Character Card V2 (export), and a card imported as a new persona or a new version.

Reading personas needs only a credential (the catalogue is what a client chats with, and every signed-in user sees
it in the app); importing is the engine's `persona.edit`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from callbot_core.api.auth import Context, CurrentActor
from callbot_core.api.errors import ERROR_RESPONSES, ErrorBody
from callbot_core.api.routes.conversations import PersonaRefText, PlainText, plain_text
from callbot_core.errors import InvalidInput
from callbot_core.personas.cards import export_card, import_card
from callbot_core.personas.catalog import all_personas
from callbot_core.personas.versions import VersionInfo, get_version, list_versions
from callbot_core.store.models import Persona, PersonaVersion

router = APIRouter(tags=["personas"], responses=ERROR_RESPONSES)

NOT_FOUND = {404: {"model": ErrorBody, "description": "No such persona or version"}}

PersonaKey = Annotated[
    PlainText, Path(min_length=1, max_length=64, description="A persona key", examples=["receptionist"])
]
PersonaRef = Annotated[
    PersonaRefText, Path(min_length=1, max_length=100, description="`key` (the latest version) or `key@version`",
              examples=["receptionist@1"]),
]  # fmt: skip


class PersonaOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # read off catalog.PersonaSummary, whose fields these are

    key: str
    name: str
    description: str
    latest: int = Field(description="The newest version's number")
    versions: int = Field(description="How many versions it has")
    production: int | None = Field(description="The version labelled production, if any")
    archived: bool


class VersionOut(BaseModel):
    ref: str
    key: str
    name: str
    description: str
    version: int
    system_prompt: str
    greeting: str
    temperature: float
    top_p: float
    max_tokens: int
    stop_words: list[str]
    backend: str | None
    model: str | None
    voice: str | None
    tags: list[str]
    note: str
    created_at: datetime
    production: bool
    archived: bool

    @classmethod
    def of(cls, v: VersionInfo) -> VersionOut:
        return cls(
            ref=v.ref, key=v.key, name=v.name, description=v.description, version=v.version,
            system_prompt=v.system_prompt, greeting=v.greeting, temperature=v.temperature, top_p=v.top_p,
            max_tokens=v.max_tokens, stop_words=list(v.stop_words), backend=v.backend, model=v.model, voice=v.voice,
            tags=list(v.tags), note=v.note, created_at=v.created_at, production=v.production, archived=v.archived,
        )  # fmt: skip


class PersonaDetail(BaseModel):
    key: str
    name: str
    description: str
    archived: bool
    production: int | None = Field(description="The version labelled production, if any")
    versions: list[VersionOut] = Field(description="Oldest first")


@router.get("/v1/personas", response_model=list[PersonaOut])
async def list_personas(
    ctx: Context,
    actor: CurrentActor,
    archived: Annotated[bool, Query(description="Include archived personas")] = False,
) -> list[PersonaOut]:
    """Every persona with its latest and production version numbers."""
    found = await run_in_threadpool(all_personas, ctx.store)
    return [PersonaOut.model_validate(p) for p in found if archived or not p.archived]


@router.get("/v1/personas/{key}", response_model=PersonaDetail, responses=NOT_FOUND)
async def show_persona(key: PersonaKey, ctx: Context, actor: CurrentActor) -> PersonaDetail:
    """One persona with all its versions (oldest first) and which one is production."""
    versions = await run_in_threadpool(list_versions, ctx.store, key)
    latest = versions[-1]  # a persona always has its first version
    production = next((v.version for v in versions if v.production), None)
    return PersonaDetail(
        key=latest.key, name=latest.name, description=latest.description, archived=latest.archived,
        production=production, versions=[VersionOut.of(v) for v in versions],
    )  # fmt: skip


@router.get("/v1/personas/{ref}/version", response_model=VersionOut, responses=NOT_FOUND)
async def show_version(ref: PersonaRef, ctx: Context, actor: CurrentActor) -> VersionOut:
    """One version by `key@version` (or the latest by `key`)."""
    return VersionOut.of(await run_in_threadpool(get_version, ctx.store, ref))


@router.get("/v1/personas/{ref}/card", response_model=dict[str, Any], responses=NOT_FOUND)
async def persona_card(ref: PersonaRef, ctx: Context, actor: CurrentActor) -> dict[str, Any]:
    """The version as a Character Card V2 (JSON); our settings are under `data.extensions.callbot`."""
    return await run_in_threadpool(export_card, ctx.store, ref)


def _check_card_text(card: Any) -> None:
    """Every string in the card (keys too) as the store can hold it; the engine checks what the fields mean.
    A loop, not recursion: a card nested as deep as JSON allows must not exhaust the stack."""
    pending: list[tuple[Any, str]] = [(card, "card")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, dict):
            pending.extend((k, where) for k in value)
            pending.extend((v, f"{where}.{k}") for k, v in value.items())
        elif isinstance(value, list):
            pending.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                plain_text(value)
            except PydanticCustomError as exc:
                raise InvalidInput(f"{where} {exc.message()}") from None


def _check_card_lengths(card: dict[str, Any]) -> None:
    """Card values bound for length-limited columns fit them (PostgreSQL would refuse the row with a driver error);
    the limits are the store's own. Anything else wrong with the card is the engine's to say."""
    data = card.get("data")
    if not isinstance(data, dict):
        return
    bounded: list[tuple[str, Any, int]] = [("data.name", data.get("name"), Persona.__table__.c.name.type.length)]
    extensions = data.get("extensions")
    ours = extensions.get("callbot") if isinstance(extensions, dict) else None
    if isinstance(ours, dict):
        columns = PersonaVersion.__table__.c
        bounded += [
            (f"data.extensions.callbot.{f}", ours.get(f), columns[f].type.length) for f in ("backend", "model", "voice")
        ]
    for where, value, limit in bounded:
        if isinstance(value, str) and len(value.strip()) > limit:
            raise InvalidInput(f"{where} is too long: {len(value.strip()):,} characters, the limit is {limit}")


CARD_EXAMPLE = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {"name": "Night desk", "description": "After-hours line", "system_prompt": "You answer calls at night.",
             "first_mes": "Hello, night desk.", "extensions": {"callbot": {"key": "night-desk", "temperature": 0.5}}},
}  # fmt: skip


@router.post("/v1/personas/import", response_model=VersionOut, status_code=201)
async def import_persona(
    ctx: Context,
    actor: CurrentActor,
    card: Annotated[dict[str, Any], Body(description="A Character Card V2 (chara_card_v2) as JSON",
                                         examples=[CARD_EXAMPLE])],
    key: Annotated[PlainText | None, Query(min_length=1, max_length=64,
                                     description="The persona key to import as (default: the card's own)")] = None,
) -> VersionOut:  # fmt: skip
    """Import a card: a new persona, or a new version of the persona with its key. A card the engine cannot use is
    a 422 naming the field."""
    _check_card_text(card)
    _check_card_lengths(card)
    info = await run_in_threadpool(lambda: import_card(ctx.store, card, actor=actor, key=key))
    return VersionOut.of(info)
