"""Persona studio: create, edit (always as a new version), clone, archive and label personas; diff
versions; render prompt variables; import and export Character Card V2 JSON.

Versions are append-only on purpose: a version used in a conversation is frozen (see `store.guards`),
and making every edit a new version means nobody has to know whether a version was used yet.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.personas.catalog import get_persona_version, parse_persona_ref
from callbot_core.personas.fields import check_field
from callbot_core.store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from callbot_core.store import Store

KEY_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")
VARIABLE_PATTERN = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
KNOWN_VARIABLES = ("caller_name", "today", "persona_name")

# Fields of a version an edit may change; anything else in `changes` is a typo the caller should hear about.
VERSION_FIELDS = (
    "system_prompt",
    "greeting",
    "temperature",
    "top_p",
    "max_tokens",
    "stop_words",
    "backend",
    "model",
    "voice",
    "tags",
    "card_extensions",
    "card_fields",
)
PERSONA_FIELDS = ("name", "description")
LONG_TEXT_FIELDS = ("system_prompt", "greeting")
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


@dataclass(frozen=True, slots=True)
class VersionInfo:
    id: int
    key: str
    name: str
    description: str
    version: int
    system_prompt: str
    greeting: str
    temperature: float
    top_p: float
    max_tokens: int
    stop_words: tuple[str, ...]
    backend: str | None
    model: str | None
    voice: str | None
    tags: tuple[str, ...]
    note: str
    created_at: datetime
    production: bool
    archived: bool

    @property
    def ref(self) -> str:
        return f"{self.key}@{self.version}"


@dataclass(frozen=True, slots=True)
class FieldDiff:
    field: str
    old: Any
    new: Any
    # A unified diff for long text fields (prompt, greeting), empty for the others.
    diff: str = ""


def _info(version: PersonaVersion) -> VersionInfo:
    persona = version.persona
    return VersionInfo(
        id=version.id,
        key=persona.key,
        name=persona.name,
        description=persona.description,
        version=version.version,
        system_prompt=version.system_prompt,
        greeting=version.greeting,
        temperature=version.temperature,
        top_p=version.top_p,
        max_tokens=version.max_tokens,
        stop_words=tuple(version.stop_words or ()),
        backend=version.backend,
        model=version.model,
        voice=version.voice,
        tags=tuple(version.tags or ()),
        note=version.note or "",
        created_at=version.created_at,
        production=persona.production_version_id == version.id,
        archived=persona.archived,
    )


# -- validation ---------------------------------------------------------------------------------


def _str_list(field: str, value: object) -> list[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(f"{field} must be a list of strings, not {value!r}")
    return [v for v in value if v != ""]


def _optional_str(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {value!r}")
    return value.strip() or None


def _validate(fields: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise version fields; every error names the field."""
    out = dict(fields)
    if "system_prompt" in out:
        if not isinstance(out["system_prompt"], str) or not out["system_prompt"].strip():
            raise InvalidInput("system_prompt must not be empty")
        out["system_prompt"] = out["system_prompt"].strip()
    if "greeting" in out:
        if not isinstance(out["greeting"], str):
            raise InvalidInput(f"greeting must be a string, not {out['greeting']!r}")
        out["greeting"] = out["greeting"].strip()
    for name in ("temperature", "top_p", "max_tokens"):
        if name in out:  # ranges and their messages: personas/fields.py, shared with comparisons and suites
            out[name] = check_field(name, out[name])
    for name in ("stop_words", "tags"):
        if name in out:
            out[name] = _str_list(name, out[name])
    for name in ("backend", "model", "voice"):
        if name in out:
            out[name] = _optional_str(name, out[name])
    for name in ("card_extensions", "card_fields"):
        if name in out and not isinstance(out[name], dict):
            raise InvalidInput(f"{name} must be an object, not {out[name]!r}")
    return out


def _persona(session: Session, key: str) -> Persona:
    persona = session.scalar(select(Persona).where(Persona.key == key))
    if persona is None:
        raise NotFound(f"Unknown persona {key!r}")
    return persona


def _latest(session: Session, persona: Persona) -> PersonaVersion:
    version = session.scalar(
        select(PersonaVersion)
        .where(PersonaVersion.persona_id == persona.id)
        .order_by(PersonaVersion.version.desc())
        .limit(1)
    )
    if version is None:
        raise NotFound(f"Persona {persona.key!r} has no versions")
    return version


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise InvalidInput(f"key {key!r} is not valid: use 1-64 lower-case letters, digits, '-' or '_'")
    return key


# -- create, edit, clone, archive, production --------------------------------------------------


def _create(
    session: Session, key: str, name: str, description: str, fields: dict[str, Any], *, actor: str | None, note: str
) -> PersonaVersion:
    _check_key(key)
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput("name must not be empty")
    if session.scalar(select(func.count()).select_from(Persona).where(Persona.key == key)):
        raise Conflict(f"A persona with key {key!r} already exists")
    fields = _validate({"greeting": "", **fields})
    if "system_prompt" not in fields:
        raise InvalidInput("system_prompt must not be empty")
    persona = Persona(key=key, name=name.strip(), description=(description or "").strip())
    version = PersonaVersion(version=1, note=note, **fields)
    persona.versions.append(version)
    session.add(persona)
    session.flush()
    return version


def create_persona(
    store: Store,
    key: str,
    name: str,
    description: str = "",
    *,
    system_prompt: str,
    greeting: str = "",
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_tokens: int = 256,
    stop_words: list[str] | None = None,
    backend: str | None = None,
    model: str | None = None,
    voice: str | None = None,
    tags: list[str] | None = None,
    actor: Actor,
) -> VersionInfo:
    """A new persona with its version 1. Raises Conflict when the key is taken."""
    require(actor, "persona.edit")
    fields = dict(
        system_prompt=system_prompt,
        greeting=greeting,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        stop_words=stop_words or [],
        backend=backend,
        model=model,
        voice=voice,
        tags=tags or [],
    )
    with store.session() as session:
        version = _create(session, key, name, description, fields, actor=actor.username, note="created")
        audit.record(session, "persona.create", actor=actor.username, target=f"{key}@1")
        return _info(version)


def _new_version(
    session: Session, persona: Persona, changes: dict[str, Any], *, actor: str | None, note: str
) -> PersonaVersion:
    unknown = sorted(set(changes) - set(VERSION_FIELDS) - set(PERSONA_FIELDS))
    if unknown:
        raise InvalidInput(f"Unknown persona field(s): {', '.join(unknown)}; editable: {', '.join(VERSION_FIELDS)}")
    latest = _latest(session, persona)
    version_changes = _validate({k: v for k, v in changes.items() if k in VERSION_FIELDS})
    if "name" in changes:
        if not isinstance(changes["name"], str) or not changes["name"].strip():
            raise InvalidInput("name must not be empty")
        persona.name = changes["name"].strip()
    if "description" in changes:
        if not isinstance(changes["description"], str):
            raise InvalidInput("description must be a string")
        persona.description = changes["description"].strip()
    # Copy from the latest, never modify it: the latest may already be frozen by a conversation.
    fields = {name: getattr(latest, name) for name in VERSION_FIELDS}
    fields.update(version_changes)
    version = PersonaVersion(persona_id=persona.id, version=latest.version + 1, note=note, **fields)
    session.add(version)
    session.flush()
    session.refresh(version)
    audit.record(
        session,
        "persona.version",
        actor=actor,
        target=f"{persona.key}@{version.version}",
        detail={"changed": sorted(changes), "note": note},
    )
    return version


def save_version(store: Store, key: str, changes: dict[str, Any], *, actor: Actor, note: str = "") -> VersionInfo:
    """Save an edit as a new version (latest + 1); fields not in `changes` are copied from the latest."""
    require(actor, "persona.edit")
    with store.session() as session:
        return _info(_new_version(session, _persona(session, key), changes, actor=actor.username, note=note))


def clone_persona(store: Store, ref: str, new_key: str, new_name: str, *, actor: Actor) -> VersionInfo:
    """A new persona whose version 1 copies `ref` (`key` or `key@version`)."""
    require(actor, "persona.edit")
    with store.session() as session:
        source = get_persona_version(session, ref)
        fields = {name: getattr(source, name) for name in VERSION_FIELDS}
        source_ref = f"{source.persona.key}@{source.version}"
        version = _create(
            session,
            new_key,
            new_name,
            source.persona.description,
            fields,
            actor=actor.username,
            note=f"cloned from {source_ref}",
        )
        audit.record(session, "persona.clone", actor=actor.username, target=f"{new_key}@1", detail={"from": source_ref})
        return _info(version)


def archive_persona(store: Store, key: str, *, archived: bool = True, actor: Actor) -> None:
    """Hide a persona from the catalogue (or bring it back); its versions stay readable and usable by ref."""
    require(actor, "persona.edit")
    with store.session() as session:
        persona = _persona(session, key)
        persona.archived = archived
        audit.record(session, "persona.archive", actor=actor.username, target=key, detail={"archived": archived})


def set_production(store: Store, ref: str, *, actor: Actor) -> VersionInfo:
    """Move the persona's `production` label to `ref` (the latest version when no version is given)."""
    require(actor, "persona.promote")
    with store.session() as session:
        version = get_persona_version(session, ref)
        persona = version.persona
        previous = persona.production_version_id
        persona.production_version_id = version.id
        session.flush()
        audit.record(
            session,
            "persona.production",
            actor=actor.username,
            target=f"{persona.key}@{version.version}",
            detail={"previous_version_id": previous},
        )
        return _info(version)


def production_version(store: Store, key: str) -> VersionInfo | None:
    """The version labelled `production`, or None when the persona has none."""
    with store.session() as session:
        persona = _persona(session, key)
        if persona.production_version_id is None:
            return None
        return _info(session.get_one(PersonaVersion, persona.production_version_id))


def list_versions(store: Store, key: str) -> list[VersionInfo]:
    """Every version of a persona, oldest first."""
    with store.session() as session:
        persona = _persona(session, key)
        return [_info(v) for v in persona.versions]


def get_version(store: Store, ref: str) -> VersionInfo:
    with store.session() as session:
        return _info(get_persona_version(session, ref))


def diff_versions(store: Store, ref_a: str, ref_b: str) -> list[FieldDiff]:
    """The fields that differ between two versions (any personas), in a stable order."""
    with store.session() as session:
        a = get_persona_version(session, ref_a)
        b = get_persona_version(session, ref_b)
        name_a, name_b = f"{a.persona.key}@{a.version}", f"{b.persona.key}@{b.version}"
        diffs: list[FieldDiff] = []
        for field in VERSION_FIELDS:
            old, new = getattr(a, field), getattr(b, field)
            if old == new:
                continue
            text = ""
            if field in LONG_TEXT_FIELDS:
                # Lines without their ends, joined after: a last line with no newline would otherwise run
                # into the next line of the diff ("-old text+new text").
                text = (
                    "\n".join(
                        difflib.unified_diff(
                            (old or "").splitlines(),
                            (new or "").splitlines(),
                            fromfile=f"{name_a} {field}",
                            tofile=f"{name_b} {field}",
                            lineterm="",
                        )
                    )
                    + "\n"
                )
            diffs.append(FieldDiff(field, old, new, text))
        return diffs


# -- prompt variables ---------------------------------------------------------------------------


def prompt_variables(text: str) -> list[str]:
    """The `{{variable}}` names in a prompt, in order of first appearance."""
    seen: dict[str, None] = {}
    for match in VARIABLE_PATTERN.finditer(text):
        seen.setdefault(match.group(1), None)
    return list(seen)


def default_variables(persona_name: str) -> dict[str, str]:
    return {"caller_name": "the caller", "today": datetime.now(UTC).date().isoformat(), "persona_name": persona_name}


def render_system_prompt(text: str, variables: dict[str, Any]) -> str:
    """Replace `{{name}}` by its value; unknown variables stay as written so a typo is visible, not blanked."""

    def _sub(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(variables[name]) if name in variables else match.group(0)

    return VARIABLE_PATTERN.sub(_sub, text)


# -- Character Card V2 --------------------------------------------------------------------------


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
                "temperature": v.temperature,
                "top_p": v.top_p,
                "max_tokens": v.max_tokens,
                "stop_words": list(v.stop_words or []),
                "backend": v.backend,
                "model": v.model,
                "voice": v.voice,
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
    for name in ("temperature", "top_p", "max_tokens", "stop_words", "backend", "model", "voice"):
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


__all__ = [
    "FieldDiff",
    "VersionInfo",
    "archive_persona",
    "clone_persona",
    "create_persona",
    "default_variables",
    "diff_versions",
    "export_card",
    "get_version",
    "import_card",
    "list_versions",
    "parse_persona_ref",
    "production_version",
    "prompt_variables",
    "render_system_prompt",
    "save_version",
    "set_production",
]
