"""The Personas page through AppTest: edit makes a new version, diff, production label, clone, cards."""

from __future__ import annotations

from callbot_core.persona_versions import get_version, list_versions, production_version
from callbot_core.store import Store
from tests.apphelpers import ADMIN_PW, PW, app_store, button, fake_ollama, sign_in, titles, view  # noqa: F401


def _personas(username: str = "rita", password: str = PW):  # type: ignore[no-untyped-def]
    at = sign_in(username, password)
    at.switch_page(view("personas")).run()
    assert titles(at) == ["Personas"], at.exception
    return at


def test_edit_saves_a_new_version_and_the_old_one_stays(app_store: Store) -> None:
    at = _personas()
    at.selectbox(key="personas_key").select("tutor").run()
    before = [v.version for v in list_versions(app_store, "tutor")]
    at.text_area(key="pe_prompt").input("You are a strict French tutor. Correct every mistake.")
    at.number_input(key="pe_temp").set_value(0.3)
    at.text_input(key="pe_note").input("stricter")
    button(at, "Save as a new version").click()
    at.run()
    assert not at.exception, at.exception
    new = max(before) + 1
    assert f"Saved tutor@{new}." in [s.value for s in at.success]
    assert get_version(app_store, f"tutor@{new}").temperature == 0.3
    assert get_version(app_store, f"tutor@{max(before)}").system_prompt.startswith("You are a patient")

    at.selectbox(key="personas_key").select("tutor").run()
    diffs = [c.value for c in at.code if "strict French tutor" in c.value]
    assert diffs and diffs[0].count("\n-") >= 1  # a unified diff of the prompt


def test_promote_clone_and_card_export(app_store: Store) -> None:
    at = _personas()
    at.selectbox(key="personas_key").select("sales").run()
    button(at, "Make sales@1 the production version").click()
    at.run()
    assert production_version(app_store, "sales").version == 1  # type: ignore[union-attr]

    at.text_input(key="pc_key").input("sales-b")
    at.text_input(key="pc_name").input("Sales, variant B")
    button(at, "Clone").click()
    at.run()
    assert "Created sales-b@1." in [s.value for s in at.success]

    labels = [b.label for b in at.get("download_button")]
    assert "Download sales@1 as a Character Card V2 (JSON)" in labels  # its body: tests/test_personas.py


def test_viewers_read_but_do_not_edit(app_store: Store) -> None:
    at = _personas("vera", PW)
    assert "Save as a new version" not in [b.label for b in at.button]
    assert any("Viewers read personas" in i.value for i in at.info)
