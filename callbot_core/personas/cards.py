"""Character Card V2 JSON: export a persona version as a card, import a card as a persona or a new version.

Cards come from the character-card ecosystem (SillyTavern, chub, Open WebUI); fields we do not use are kept in
`card_fields` and given back on export.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import InvalidInput
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.versions import (
    VersionInfo,
    _check_key,
    _create,
    _info,
    _new_version,
    _str_list,
    _validate,
)
from callbot_core.store.models import Persona

if TYPE_CHECKING:
    from callbot_core.store import Store

# Character Card V2 fields kept in `card_fields` (we do not use them, but an export must give them back).
CARD_KEPT_FIELDS = {
    "personality": str,
    "scenario": str,
    "mes_example": str,
    "creator_notes": str,
    "post_history_instructions": str,
    "alternate_greetings": list,
    "creator": str,
    "character_version": str,
    "character_book": dict,
}
CARD_SPEC = "chara_card_v2"


# The version settings a card carries under data.extensions.callbot, written on export and read back on import.
CALLBOT_SETTINGS = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop_words",
    "backend",
    "model",
    "voice",
    "knowledge_collection",
    "knowledge_k",
    "knowledge_threshold",
)


def export_card(store: Store, ref: str) -> dict[str, Any]:
    """A Character Card V2 dict for `ref`; our settings go under data.extensions.callbot."""
    with store.session() as session:
        v = get_persona_version(session, ref)
        kept = dict(v.card_fields or {})
        data: dict[str, Any] = {
            "name": v.persona.name,
            "description": v.persona.description,
            "personality": kept.pop("personality", ""),
            "scenario": kept.pop("scenario", ""),
            "first_mes": v.greeting,
            "mes_example": kept.pop("mes_example", ""),
            "creator_notes": kept.pop("creator_notes", ""),
            "system_prompt": v.system_prompt,
            "post_history_instructions": kept.pop("post_history_instructions", ""),
            "alternate_greetings": kept.pop("alternate_greetings", []),
            "tags": list(v.tags or []),
            "creator": kept.pop("creator", ""),
            "character_version": kept.pop("character_version", ""),
        }
        if "character_book" in kept:
            data["character_book"] = kept.pop("character_book")
        data["extensions"] = {
            **(v.card_extensions or {}),
            "callbot": {
                "key": v.persona.key,
                "version": v.version,
                **{name: getattr(v, name) for name in CALLBOT_SETTINGS},
                "stop_words": list(v.stop_words or []),
            },
        }
        return {"spec": CARD_SPEC, "spec_version": "2.0", "data": data}


def _parse_card(card: dict | bytes | str) -> dict[str, Any]:
    if isinstance(card, bytes):
        if card.startswith(b"\x89PNG"):
            raise InvalidInput("PNG character cards are not supported: export the card as JSON (chara_card_v2)")
        try:
            card = card.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("The card is not UTF-8 JSON; only JSON Character Card V2 files are supported") from None
    if isinstance(card, str):
        try:
            card = json.loads(card)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"The card is not valid JSON ({exc}); only JSON Character Card V2 works") from None
    if not isinstance(card, dict):
        raise InvalidInput("The card must be a JSON object with spec, spec_version and data")
    if card.get("spec") != CARD_SPEC:
        raise InvalidInput(f"spec must be {CARD_SPEC!r}, not {card.get('spec')!r}")
    data = card.get("data")
    if not isinstance(data, dict):
        raise InvalidInput("data is missing or not an object")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("data.name is missing or empty")
    for field in ("description", "first_mes", "system_prompt"):
        if field in data and not isinstance(data[field], str):
            raise InvalidInput(f"data.{field} must be a string, not {type(data[field]).__name__}")
    for field, kind in CARD_KEPT_FIELDS.items():
        if field in data and data[field] is not None and not isinstance(data[field], kind):
            raise InvalidInput(f"data.{field} must be a {kind.__name__}, not {type(data[field]).__name__}")
    if "tags" in data:
        _str_list("data.tags", data["tags"])
    if "alternate_greetings" in data:
        _str_list("data.alternate_greetings", data["alternate_greetings"])
    extensions = data.get("extensions", {})
    if not isinstance(extensions, dict):
        raise InvalidInput("data.extensions must be an object")
    if not isinstance(extensions.get("callbot", {}), dict):
        raise InvalidInput("data.extensions.callbot must be an object")
    return data


def _card_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Version fields from a validated card's data."""
    extensions = dict(data.get("extensions") or {})
    ours = extensions.pop("callbot", {}) or {}
    system_prompt = data.get("system_prompt") or ""
    if not system_prompt.strip():
        # Cards written for chat front ends often leave system_prompt empty and describe the character instead.
        parts = [data.get(f) or "" for f in ("description", "personality", "scenario")]
        system_prompt = "\n\n".join(p.strip() for p in parts if p.strip())
    if not system_prompt.strip():
        raise InvalidInput("data.system_prompt is empty and so are data.description, personality and scenario")
    fields: dict[str, Any] = {
        "system_prompt": system_prompt,
        "greeting": data.get("first_mes") or "",
        "tags": list(data.get("tags") or []),
        "card_extensions": extensions,
        "card_fields": {f: data[f] for f in CARD_KEPT_FIELDS if data.get(f) not in (None, "", [])},
    }
    for name in CALLBOT_SETTINGS:
        if name in ours:
            fields[name] = ours[name]
    try:
        return _validate(fields)
    except InvalidInput as exc:
        # Say where in the card the bad value was.
        raise InvalidInput(f"data.extensions.callbot.{exc}") from None


def import_card(store: Store, card: dict | bytes | str, *, actor: Actor, key: str | None = None) -> VersionInfo:
    """Import a Character Card V2 (JSON only): a new persona, or a new version when the key exists."""
    require(actor, "persona.edit")
    data = _parse_card(card)
    fields = _card_fields(data)
    ours = (data.get("extensions") or {}).get("callbot") or {}
    if key is None:
        key = ours.get("key") if isinstance(ours.get("key"), str) else None
    if key is None:
        key = re.sub(r"[^a-z0-9_-]+", "-", data["name"].lower()).strip("-")[:64] or "imported"
    _check_key(key)
    with store.session() as session:
        persona = session.scalar(select(Persona).where(Persona.key == key))
        if persona is None:
            version = _create(
                session,
                key,
                data["name"],
                data.get("description") or "",
                fields,
                actor=actor.username,
                note="imported card",
            )
            audit.record(session, "persona.create", actor=actor.username, target=f"{key}@1", detail={"source": "card"})
        else:
            changes = {**fields, "name": data["name"], "description": data.get("description") or ""}
            version = _new_version(session, persona, changes, actor=actor.username, note="imported card")
        return _info(version)
