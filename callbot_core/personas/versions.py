"""Persona studio: create, edit (always as a new version), clone, archive and label personas; diff versions.
Prompt variables are in `variables.py`, Character Cards in `cards.py`.

Versions are append-only on purpose: a version used in a conversation is frozen (see `store.guards`),
and making every edit a new version means nobody has to know whether a version was used yet.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.personas.catalog import get_persona_version, parse_persona_ref
from callbot_core.personas.fields import KNOWLEDGE_K, KNOWLEDGE_THRESHOLD, check_field
from callbot_core.store.models import Persona, PersonaVersion

if TYPE_CHECKING:
    from callbot_core.store import Store

KEY_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")

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
    "knowledge_collection",
    "knowledge_k",
    "knowledge_threshold",
)
PERSONA_FIELDS = ("name", "description")
LONG_TEXT_FIELDS = ("system_prompt", "greeting")


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
    knowledge_collection: str | None
    knowledge_k: int
    knowledge_threshold: float | None
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
        knowledge_collection=version.knowledge_collection,
        knowledge_k=version.knowledge_k if version.knowledge_k is not None else 4,
        knowledge_threshold=version.knowledge_threshold,
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
    if "knowledge_collection" in out:
        name = _optional_str("knowledge_collection", out["knowledge_collection"])
        out["knowledge_collection"] = None if name is None else _collection_name(name)
    if "knowledge_k" in out:
        out["knowledge_k"] = KNOWLEDGE_K.check(out["knowledge_k"])
    if out.get("knowledge_threshold") is not None:
        out["knowledge_threshold"] = KNOWLEDGE_THRESHOLD.check(out["knowledge_threshold"])
    for name in ("card_extensions", "card_fields"):
        if name in out and not isinstance(out[name], dict):
            raise InvalidInput(f"{name} must be an object, not {out[name]!r}")
    return out


def _collection_name(name: str) -> str:
    from callbot_core.knowledge.index import check_collection_name  # a leaf check; knowledge imports personas

    return check_collection_name(name)


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


def _check_known(changes: dict[str, Any]) -> None:
    unknown = sorted(set(changes) - set(VERSION_FIELDS) - set(PERSONA_FIELDS))
    if unknown:
        raise InvalidInput(f"Unknown persona field(s): {', '.join(unknown)}; editable: {', '.join(VERSION_FIELDS)}")


def _apply_persona_fields(persona: Persona, changes: dict[str, Any]) -> list[str]:
    """Set the persona's own fields (name, description: they belong to every version); returns those that changed."""
    changed = []
    if "name" in changes:
        if not isinstance(changes["name"], str) or not changes["name"].strip():
            raise InvalidInput("name must not be empty")
        if persona.name != changes["name"].strip():
            persona.name = changes["name"].strip()
            changed.append("name")
    if "description" in changes:
        if not isinstance(changes["description"], str):
            raise InvalidInput("description must be a string")
        if persona.description != changes["description"].strip():
            persona.description = changes["description"].strip()
            changed.append("description")
    return changed


def _new_version(
    session: Session, persona: Persona, changes: dict[str, Any], *, actor: str | None, note: str
) -> PersonaVersion:
    _check_known(changes)
    latest = _latest(session, persona)
    version_changes = _validate({k: v for k, v in changes.items() if k in VERSION_FIELDS})
    _apply_persona_fields(persona, changes)
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
    """Save an edit as a new version (latest + 1); fields not in `changes` are copied from the latest.

    An edit that changes no version field makes no version: a new name or description alone is saved on the
    persona (`latest` is returned), and an edit that changes nothing at all is refused, so versions always differ.
    """
    require(actor, "persona.edit")
    _check_known(changes)
    with store.session() as session:
        persona = _persona(session, key)
        latest = _latest(session, persona)
        version_changes = _validate({k: v for k, v in changes.items() if k in VERSION_FIELDS})
        if all(getattr(latest, field) == value for field, value in version_changes.items()):
            renamed = _apply_persona_fields(persona, changes)
            if not renamed:
                raise InvalidInput(
                    f"Nothing to save: these are the settings of {key}@{latest.version} already; change a field first"
                )
            audit.record(session, "persona.rename", actor=actor.username, target=key, detail={"changed": renamed})
            return _info(latest)
        return _info(_new_version(session, persona, changes, actor=actor.username, note=note))


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


# -- word diff ----------------------------------------------------------------------------------

# A word, a run of whitespace, or one other character: punctuation changes on its own, not with its word.
_WORD_TOKENS = re.compile(r"\w+|\s+|[^\w\s]")
# What is compared first: text up to the next whitespace with that whitespace, so the commonest tokens (a space, a
# full stop) are not matched one by one across a long prompt (quadratic in difflib); only the stretches that differ
# are compared again word by word.
_COARSE_TOKENS = re.compile(r"\S+\s*|\s+")
# A changed stretch larger than this (tokens before × tokens after) is shown as removed and added whole: it was
# rewritten, and matching its common words one by one would take seconds and say little.
_FINE_DIFF_LIMIT = 250_000


class WordSpan(NamedTuple):
    """A stretch of text in a word diff: in both texts ("same"), only in the old one ("removed") or only in the new
    one ("added")."""

    kind: Literal["same", "removed", "added"]
    text: str


def _add(chunks: list[list[str]], chunk: list[str]) -> None:
    """Append [same] or [removed, added] to `chunks`, merging it with what it continues; whitespace alone between
    two changes joins them."""
    if not any(chunk):
        return
    if chunks and len(chunks[-1]) == len(chunk):
        chunks[-1] = [x + y for x, y in zip(chunks[-1], chunk, strict=True)]
    elif len(chunk) == 2 and len(chunks) >= 2 and not chunks[-1][0].strip() and len(chunks[-2]) == 2:
        space = chunks.pop()[0]
        before = chunks.pop()
        chunks.append([before[0] + space + chunk[0], before[1] + space + chunk[1]])
    else:
        chunks.append(chunk)


def _diff_tokens(chunks: list[list[str]], a: list[str], b: list[str], fine: bool) -> None:
    # autojunk off: it would take the space, the commonest token of any long prompt, for noise and match nothing.
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = "".join(a[i1:i2]), "".join(b[j1:j2])
        if tag == "equal":
            _add(chunks, [old])
        elif tag == "replace" and not fine and (i2 - i1) * (j2 - j1) <= _FINE_DIFF_LIMIT:
            _diff_tokens(chunks, _WORD_TOKENS.findall(old), _WORD_TOKENS.findall(new), fine=True)
        else:
            _add(chunks, [old, new])


def _start_changes_at_words(chunks: list[list[str]]) -> None:
    """Slide each pure insertion or deletion that starts with whitespace to the right while the text after it starts
    with the same character: "helpful| <b>x</b>| assistant" and "helpful |<b>x</b> |assistant" say the same, and
    the second reads as words added. Chunks are [same] or [removed, added], as in `word_diff`."""
    out: list[list[str]] = []
    for i, chunk in enumerate(chunks):
        if len(chunk) == 2 and not (chunk[0] and chunk[1]) and i + 1 < len(chunks):
            side = 0 if chunk[0] else 1
            text, after, moved = chunk[side], chunks[i + 1], ""
            while text[:1].isspace() and after[0][:1] == text[0]:
                moved += text[0]
                text = text[1:] + text[0]
                after[0] = after[0][1:]
            _add(out, [moved])
            chunk = [text, ""] if side == 0 else ["", text]
        _add(out, chunk)
    chunks[:] = out


def word_diff(old: str, new: str) -> list[WordSpan]:
    """The changes from `old` to `new` word by word, for showing a prompt or greeting with its changed words marked.

    The "same" and "removed" spans joined give `old`, the "same" and "added" ones `new` (whitespace and line breaks
    included); a change shows as its removed text followed by its added text. Whitespace alone between two changed
    words is folded into the change, so "one two" -> "uno dos" is one change rather than two split by a space.
    """
    chunks: list[list[str]] = []  # [same] or [removed, added]
    _diff_tokens(chunks, _COARSE_TOKENS.findall(old), _COARSE_TOKENS.findall(new), fine=False)
    _start_changes_at_words(chunks)
    spans: list[WordSpan] = []
    for chunk in chunks:
        if len(chunk) == 1:
            spans.append(WordSpan("same", chunk[0]))
            continue
        if chunk[0]:
            spans.append(WordSpan("removed", chunk[0]))
        if chunk[1]:
            spans.append(WordSpan("added", chunk[1]))
    return spans


__all__ = [
    "FieldDiff",
    "VersionInfo",
    "WordSpan",
    "archive_persona",
    "clone_persona",
    "create_persona",
    "diff_versions",
    "get_version",
    "list_versions",
    "parse_persona_ref",
    "production_version",
    "save_version",
    "set_production",
    "word_diff",
]
