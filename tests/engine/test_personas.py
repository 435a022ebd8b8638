"""Persona studio: versions, clone, archive, production label, diff, prompt variables, Character Cards."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from callbot_core.access import audit
from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.personas.cards import export_card, import_card
from callbot_core.personas.catalog import get_persona_version, persona_catalog
from callbot_core.personas.variables import prompt_variables, render_system_prompt
from callbot_core.personas.versions import (
    archive_persona,
    clone_persona,
    create_persona,
    diff_versions,
    get_version,
    list_versions,
    production_version,
    save_version,
    set_production,
    word_diff,
)
from callbot_core.store.models import Conversation, Persona, PersonaVersion
from tests.fake_ollama import FakeOllama

T = OperatorActor(username="t", role="admin")


def _service(store, settings, url: str) -> ConversationService:
    backend = OllamaBackend(url, default_model="smollm2:135m", connect_timeout_s=0.5, read_timeout_s=2)
    return ConversationService(store, settings, backends=lambda name: backend)


def _counts(store) -> tuple[int, int]:
    with store.session() as session:
        return (
            session.scalar(select(func.count()).select_from(Persona)),
            session.scalar(select(func.count()).select_from(PersonaVersion)),
        )


def test_an_edit_that_changes_nothing_makes_no_version(store) -> None:
    latest = get_version(store, "receptionist")
    same = {"system_prompt": latest.system_prompt, "temperature": latest.temperature, "name": latest.name}
    with pytest.raises(InvalidInput, match=r"Nothing to save: these are the settings of receptionist@1 already"):
        save_version(store, "receptionist", same, actor=T, note="no change")
    assert [v.version for v in list_versions(store, "receptionist")] == [1]
    # A new name alone belongs to the persona: saved, still no version.
    renamed = save_version(store, "receptionist", {**same, "name": "Front desk"}, actor=T)
    assert renamed.version == 1 and renamed.name == "Front desk"
    assert [v.version for v in list_versions(store, "receptionist")] == [1]


def test_edits_make_new_versions_and_old_ones_stay_usable(store, settings) -> None:
    v2 = save_version(store, "receptionist", {"system_prompt": "You are a terse receptionist."}, actor=T, note="terse")
    assert v2.version == 2 and v2.note == "terse"
    v1 = get_version(store, "receptionist@1")
    assert v1.system_prompt.startswith("You are the receptionist") and v2.greeting == v1.greeting
    assert v2.temperature == v1.temperature  # unspecified fields are copied from the latest
    v3 = save_version(store, "receptionist", {"temperature": 1.2}, actor=T)
    assert v3.system_prompt == "You are a terse receptionist." and v3.temperature == 1.2
    assert [v.version for v in list_versions(store, "receptionist")] == [1, 2, 3]
    with FakeOllama() as fake:
        service = _service(store, settings, fake.url)
        info = service.start("receptionist@1", actor=LOCAL_OPERATOR)
        assert info.persona_version == 1
        turn = service.send(info.id, "hi", actor=LOCAL_OPERATOR)
        assert turn.turn.messages[0].content == v1.system_prompt
        turn.text()
    assert [e.action for e in audit.recent(store, actor=T, action_prefix="persona.")] == ["persona.version"] * 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"system_prompt": "  "}, "system_prompt"),
        ({"stop_words": "END"}, "stop_words"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_edits_name_the_field_and_store_nothing(store, changes, field) -> None:
    before = _counts(store)
    with pytest.raises(InvalidInput, match=field):
        save_version(store, "support", changes, actor=T)
    assert _counts(store) == before


def test_a_used_version_cannot_change_but_save_version_still_works(store, settings) -> None:
    with FakeOllama() as fake:
        service = _service(store, settings, fake.url)
        service.start("support@1", actor=LOCAL_OPERATOR)
    v2 = save_version(store, "support", {"greeting": "Support here."}, actor=T)
    assert v2.version == 2 and get_version(store, "support@1").greeting.startswith("Hello, thanks")
    with pytest.raises(Conflict, match="cannot change"), store.session() as session:
        get_persona_version(session, "support@1").greeting = "rewritten"
    assert get_version(store, "support@1").greeting.startswith("Hello, thanks")


def test_create_validates_the_key_and_refuses_duplicates(store) -> None:
    info = create_persona(
        store, "bank-bot_2", "Bank bot", system_prompt="You work at a bank.", stop_words=["Caller:"], actor=T
    )
    assert info.ref == "bank-bot_2@1" and info.stop_words == ("Caller:",)
    with pytest.raises(Conflict):
        create_persona(store, "bank-bot_2", "Again", system_prompt="x", actor=T)
    with pytest.raises(InvalidInput, match="key"):
        create_persona(store, "Bank Bot", "Bank bot", system_prompt="x", actor=T)
    assert [e.action for e in audit.recent(store, actor=T, action_prefix="persona.")] == ["persona.create"]


def test_clone_and_archive(store, settings) -> None:
    save_version(store, "receptionist", {"greeting": "Clinic, hello."}, actor=T)
    clone = clone_persona(store, "receptionist@1", "receptionist-b", "Receptionist B", actor=T)
    assert clone.version == 1 and clone.note == "cloned from receptionist@1"
    assert clone.system_prompt == get_version(store, "receptionist@1").system_prompt
    assert clone.greeting.startswith("Good morning")
    archive_persona(store, "receptionist-b", actor=T)
    assert "receptionist-b" not in [c.key for c in persona_catalog(store)]
    assert get_version(store, "receptionist-b@1").archived
    with FakeOllama() as fake:
        assert (
            _service(store, settings, fake.url).start("receptionist-b@1", actor=LOCAL_OPERATOR).persona_key
            == "receptionist-b"
        )
    archive_persona(store, "receptionist-b", archived=False, actor=T)
    assert "receptionist-b" in [c.key for c in persona_catalog(store)]
    actions = [e.action for e in audit.recent(store, actor=T, action_prefix="persona.")]
    assert actions == ["persona.archive", "persona.archive", "persona.clone", "persona.version"]
    with pytest.raises(NotFound):
        clone_persona(store, "nobody", "x", "X", actor=T)


def test_the_production_label_moves(store) -> None:
    assert production_version(store, "tutor") is None
    save_version(store, "tutor", {"temperature": 0.3}, actor=T)
    assert set_production(store, "tutor@1", actor=T).production
    assert production_version(store, "tutor").version == 1
    set_production(store, "tutor@2", actor=T)
    assert production_version(store, "tutor").version == 2
    assert [v.production for v in list_versions(store, "tutor")] == [False, True]


def test_diff_lists_changed_fields_with_a_text_diff(store) -> None:
    save_version(store, "sales", {"system_prompt": "You sell software.\nBe brief.", "max_tokens": 64}, actor=T)
    diffs = {d.field: d for d in diff_versions(store, "sales@1", "sales@2")}
    assert set(diffs) == {"system_prompt", "max_tokens"}
    assert diffs["max_tokens"].old == 256 and diffs["max_tokens"].new == 64 and diffs["max_tokens"].diff == ""
    text = diffs["system_prompt"].diff
    assert "--- sales@1 system_prompt" in text and "+++ sales@2 system_prompt" in text and "+Be brief." in text
    # The old prompt's last line has no newline: its "-" line must still end before the "+" lines start.
    assert "\n+You sell software.\n" in text and all(line[:1] in "-+@ " for line in text.splitlines()), text
    assert diff_versions(store, "sales@2", "sales@2") == []


def test_render_system_prompt() -> None:
    text = "Hi {{caller_name}}, today is {{ today }}. I am {{persona_name}}. {{unknown}}"
    assert prompt_variables(text) == ["caller_name", "today", "persona_name", "unknown"]
    out = render_system_prompt(text, {"caller_name": "Ann", "today": "2026-01-02", "persona_name": "Bot"})
    assert out == "Hi Ann, today is 2026-01-02. I am Bot. {{unknown}}"


def test_variables_render_in_the_prompt_sent(store, settings) -> None:
    save_version(
        store,
        "assistant",
        {"system_prompt": "Speak to {{caller_name}} on {{today}} as {{persona_name}}. {{mood}}", "stop_words": ["X:"]},
        actor=T,
    )
    today = datetime.now(UTC).date().isoformat()
    with FakeOllama() as fake:
        service = _service(store, settings, fake.url)
        named = service.start("assistant", variables={"caller_name": "Ann"}, actor=LOCAL_OPERATOR)
        turn = service.send(named.id, "hi", actor=LOCAL_OPERATOR)
        assert turn.turn.messages[0].content == f"Speak to Ann on {today} as General assistant. {{{{mood}}}}"
        assert turn.turn.params.stop == ("X:",)
        turn.text()
        default = service.start("assistant", actor=LOCAL_OPERATOR)
        turn = service.send(default.id, "hi", actor=LOCAL_OPERATOR)
        assert turn.turn.messages[0].content.startswith("Speak to the caller on")
        turn.text()
        # The variables are stored with the conversation: another process (a restart, another replica) renders
        # the same prompt, {{today}} included, which stays the day the conversation started.
        with store.session() as s:
            row = s.get(Conversation, named.id)
            assert row.variables == {"caller_name": "Ann", "today": today, "persona_name": "General assistant"}
            row.variables = {**row.variables, "today": "2026-01-02"}  # as if it had started on that day
        again = _service(store, settings, fake.url).send(named.id, "hello again", actor=LOCAL_OPERATOR)
        assert again.turn.messages[0].content == "Speak to Ann on 2026-01-02 as General assistant. {{mood}}"
        again.text()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ("Ann", "must be a mapping of names to text, not str"),
        ({"caller name": "Ann"}, "name 'caller name' is not valid"),
        ({"caller_name": 7}, "'caller_name' must be text, not int"),
        ({"caller_name": "A" * 501}, "'caller_name' is too long: 501 characters, the limit is 500"),
        ({f"v{i}": "x" for i in range(31)}, "Too many prompt variables: 31"),
    ],
)
def test_bad_variables_are_refused_and_nothing_is_stored(store, settings, variables, message) -> None:
    with FakeOllama() as fake:
        service = _service(store, settings, fake.url)
        with store.session() as s:
            before = s.scalar(select(func.count()).select_from(Conversation))
        with pytest.raises(InvalidInput, match=re.escape(message)):
            service.start("assistant", variables=variables, actor=LOCAL_OPERATOR)
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(Conversation)) == before


FULL_CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Hotel concierge",
        "description": "A concierge at a seaside hotel.",
        "personality": "warm, precise",
        "scenario": "The guest calls the front desk.",
        "first_mes": "Front desk, good evening.",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello!",
        "creator_notes": "Test card.",
        "system_prompt": "You are the concierge of the Seaview Hotel. Be brief.",
        "post_history_instructions": "Stay in character.",
        "alternate_greetings": ["Seaview Hotel, how may I help?"],
        "character_book": {"entries": [{"keys": ["pool"], "content": "Open 7-22."}]},
        "tags": ["hotel", "test"],
        "creator": "tester",
        "character_version": "3",
        "extensions": {
            "depth_prompt": {"prompt": "x", "depth": 4},
            "talkativeness": "0.5",
            "callbot": {"temperature": 0.4, "top_p": 0.9, "max_tokens": 128, "stop_words": ["Guest:"], "voice": "amy"},
        },
    },
}


def test_a_card_round_trip_keeps_every_field_and_unknown_extensions(store) -> None:
    info = import_card(store, json.dumps(FULL_CARD), actor=T, key="concierge")
    assert info.ref == "concierge@1" and info.greeting == "Front desk, good evening."
    assert info.temperature == 0.4 and info.stop_words == ("Guest:",) and info.voice == "amy"
    card = export_card(store, "concierge@1")
    assert card["spec"] == "chara_card_v2" and card["spec_version"] == "2.0"
    ours = card["data"]["extensions"].pop("callbot")
    assert ours["key"] == "concierge" and ours["version"] == 1 and ours["max_tokens"] == 128
    original = json.loads(json.dumps(FULL_CARD))
    original["data"]["extensions"].pop("callbot")
    assert card["data"] == original["data"]
    # Importing the exported card again under the same key makes a new version, identical in content.
    again = import_card(store, export_card(store, "concierge"), actor=T)
    assert again.ref == "concierge@2"
    assert diff_versions(store, "concierge@1", "concierge@2") == []


def test_an_empty_system_prompt_falls_back_to_description_personality_scenario(store) -> None:
    card = {"spec": "chara_card_v2", "data": {"name": "Pirate Pete", "description": "A pirate.", "personality": "loud"}}
    info = import_card(store, card, actor=T)
    assert info.key == "pirate-pete" and info.system_prompt == "A pirate.\n\nloud"


@pytest.mark.parametrize(
    ("card", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"\x89PNG\r\n\x1a\n....", "PNG"),
        ('{"spec": "chara_card_v3", "data": {"name": "x"}}', "spec"),
        ({"spec": "chara_card_v2"}, "data"),
        ({"spec": "chara_card_v2", "data": {"description": "no name"}}, "data.name"),
        ({"spec": "chara_card_v2", "data": {"name": "x", "first_mes": 3, "system_prompt": "p"}}, "data.first_mes"),
        ({"spec": "chara_card_v2", "data": {"name": "x", "tags": "a,b", "system_prompt": "p"}}, "data.tags"),
        ({"spec": "chara_card_v2", "data": {"name": "x"}}, "data.system_prompt"),
        (
            {
                "spec": "chara_card_v2",
                "data": {"name": "x", "system_prompt": "p", "extensions": {"callbot": {"top_p": 3}}},
            },
            "data.extensions.callbot.top_p",
        ),
    ],
)
def test_malformed_cards_are_refused_and_nothing_is_stored(store, card, message) -> None:
    before = _counts(store)
    with pytest.raises(InvalidInput, match=message):
        import_card(store, card, actor=T)
    assert _counts(store) == before


def test_cli_import_export_versions_diff_promote(run, tmp_path: Path) -> None:
    run("db", "upgrade")
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(FULL_CARD))
    assert "Imported concierge@1" in run("persona", "import", str(card_file), "--key", "concierge").stdout
    exported = json.loads(run("persona", "export", "concierge@1").stdout)
    assert exported["data"]["extensions"]["talkativeness"] == "0.5"
    exported["data"]["system_prompt"] = "You are the concierge. Be very brief."
    card_file.write_text(json.dumps(exported))
    assert "Imported concierge@2" in run("persona", "import", str(card_file)).stdout
    out_file = tmp_path / "out.json"
    run("persona", "export", "concierge", "--out", str(out_file))
    assert json.loads(out_file.read_text())["data"]["extensions"]["callbot"]["version"] == 2
    diff = run("persona", "diff", "concierge@1", "concierge@2").stdout
    assert (
        "-You are the concierge of the Seaview Hotel. Be brief." in diff and "+You are the concierge. Be very" in diff
    )
    assert "concierge@1 is now production" in run("persona", "promote", "concierge@1").stdout
    versions = run("persona", "versions", "concierge").stdout
    assert "1 *" in versions and "imported card" in versions
    bad = tmp_path / "bad.json"
    bad.write_text('{"spec": "chara_card_v2", "data": {}}')
    proc = run("persona", "import", str(bad), ok=False)
    assert proc.returncode == 1 and "data.name" in proc.stderr


def test_cli_clone_and_edit(run, tmp_path: Path) -> None:
    run("db", "upgrade")
    assert "Created desk@1 (Clinic receptionist (copy))." in run("persona", "clone", "receptionist@1", "desk").stdout
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are Sam at the front desk. Answer in one sentence.", encoding="utf-8")
    out = run("persona", "edit", "desk", "--system-prompt-file", str(prompt), "--temperature", "0.3",
              "--stop", "Caller:", "--note", "one sentence").stdout  # fmt: skip
    assert "Saved desk@2." in out
    diff = run("persona", "diff", "desk@1", "desk@2").stdout
    assert "+You are Sam at the front desk." in diff and "temperature: 0.5 -> 0.3" in diff, diff
    assert "one sentence" in run("persona", "versions", "desk").stdout

    for args, message in [
        (("persona", "edit", "desk"), "Nothing to change"),
        (("persona", "edit", "desk", "--system-prompt", "a", "--system-prompt-file", str(prompt)), "not both"),
        (("persona", "edit", "desk", "--temperature", "9"), "temperature"),
        (("persona", "edit", "nobody", "--temperature", "0.2"), "nobody"),
        (("persona", "clone", "receptionist", "desk"), "desk"),
        (("persona", "clone", "pirate", "p2"), "pirate"),
    ]:
        proc = run(*args, ok=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert "3" not in [line.split()[0] for line in run("persona", "versions", "desk").stdout.splitlines()[2:]]


def test_word_diff_marks_the_words_that_changed() -> None:
    assert word_diff("You are a patient English tutor.", "You are a strict English tutor!") == [
        ("same", "You are a "),
        ("removed", "patient"),
        ("added", "strict"),
        ("same", " English tutor"),
        ("removed", "."),
        ("added", "!"),
    ]
    # Added words start at a word, not at the space before it.
    assert word_diff("a helpful assistant", "a helpful new assistant") == [
        ("same", "a helpful "),
        ("added", "new "),
        ("same", "assistant"),
    ]
    # Spaces alone between changed words do not cut a change into pieces.
    assert word_diff("one two three", "uno dos tres") == [("removed", "one two three"), ("added", "uno dos tres")]
    assert word_diff("Line one.\nLine two.", "Line one.\nLine 2.") == [
        ("same", "Line one.\nLine "),
        ("removed", "two"),
        ("added", "2"),
        ("same", "."),
    ]
    assert word_diff("same text", "same text") == [("same", "same text")]
    assert word_diff("", "") == []
    assert word_diff("", "Hello") == [("added", "Hello")]
    assert word_diff("Hello", "") == [("removed", "Hello")]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("You are the receptionist.\n\nBe brief.", "You are Sam, the receptionist.\nBe  very brief!\n"),
        ("a b c d e f", "f e d c b a"),
        ("  indented\n\tline", "indented\nline  "),
        ("Don't <b>shout</b>", "Do not <i>shout</i> :red[ever]"),
    ],
)
def test_word_diff_keeps_every_character_of_both_texts(old: str, new: str) -> None:
    spans = word_diff(old, new)
    assert "".join(text for kind, text in spans if kind != "added") == old
    assert "".join(text for kind, text in spans if kind != "removed") == new
    assert all(text for _, text in spans) and all(a[0] != b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_word_diff_shows_a_rewritten_text_removed_and_added_whole() -> None:
    old = " ".join(f"old{i}" for i in range(600))
    new = " ".join(f"new{i}" for i in range(600))
    assert word_diff(old, new) == [("removed", old), ("added", new)]
    # A long prompt with a few words changed is still compared word by word.
    assert ("added", "CHANGED") in word_diff(old, old.replace("old300 ", "CHANGED "))
