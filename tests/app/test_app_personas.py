"""The Personas page through AppTest: edit makes a new version, diff, production label, clone, cards."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Block

from app.rendering import plain_markdown
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.personas.versions import (
    clone_persona,
    create_persona,
    get_version,
    list_versions,
    production_version,
    save_version,
)
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.app.helpers import PW, button, sign_in, titles, view


def _personas(username: str = "rita", password: str = PW):  # type: ignore[no-untyped-def]
    at = sign_in(username, password)
    at.switch_page(view("personas")).run()
    assert titles(at) == ["Personas"], at.exception
    return at


def test_edit_saves_a_new_version_and_the_old_one_stays(app_store: Store) -> None:
    at = _personas()
    at.selectbox(key="personas_key").select("tutor").run()
    before = [v.version for v in list_versions(app_store, "tutor")]
    ref = f"tutor@{max(before)}"
    at.text_area(key=f"pe_prompt_{ref}").input("You are a strict French tutor. Correct every mistake.")
    at.number_input(key=f"pe_temp_{ref}").set_value(0.3)
    at.text_input(key=f"pe_note_{ref}").input("stricter")
    at.text_input(key=f"pe_name_{ref}").input("Strict French tutor")
    button(at, "Save as a new version").click()
    at.run()
    assert not at.exception, at.exception
    new = max(before) + 1
    assert f"Saved tutor@{new}." in [s.value for s in at.success]
    assert get_version(app_store, f"tutor@{new}").temperature == 0.3
    assert get_version(app_store, f"tutor@{new}").name == "Strict French tutor"
    assert get_version(app_store, f"tutor@{max(before)}").system_prompt.startswith("You are a patient")
    assert at.selectbox(key="personas_version_tutor").value == new  # the page shows the version just saved

    at.selectbox(key="personas_key").select("tutor").run()
    diffs = [c.value for c in at.code if c.value.startswith("--- tutor@") and "strict French tutor" in c.value]
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
    assert at.selectbox(key="personas_key").value == "sales-b"  # the clone is shown, ready to edit
    assert not at.warning, [w.value for w in at.warning]

    labels = [b.label for b in at.get("download_button")]
    assert "Download sales-b@1 as a Character Card V2 (JSON)" in labels  # its body: tests/test_personas.py


def test_viewers_see_only_the_tabs_they_can_use(app_store: Store) -> None:
    at = _personas("vera", PW)
    assert [t.label for t in at.tabs] == ["Version", "Diff", "Card"]
    assert "Save as a new version" not in [b.label for b in at.button]
    assert [t.label for t in _personas("rita", PW).tabs] == ["Version", "Edit", "Diff", "Manage", "Card", "Suites"]


@pytest.mark.model
def test_a_researcher_runs_a_suite_with_progress(
    request: pytest.FixtureRequest, app_store: Store, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from callbot_core.store.models import EvalResult, EvalRun

    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "tiny.yaml").write_text(
        "name: tiny\nturns:\n  - say: What are your opening hours?\n    expect:\n      - max_words: 500\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("CALLBOT_SUITES_DIR", str(suites))
    # Settings are read once per process: read them again with the suites folder, and again after the test.
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    fast = save_version(
        app_store, "receptionist", {"max_tokens": 12}, note="short replies for a fast test", actor=LOCAL_OPERATOR
    )
    at = _personas()
    at.selectbox(key="personas_key").select("receptionist").run()
    assert at.selectbox(key="ps_suite").options == ["tiny.yaml", "(uploaded file)"]
    assert at.multiselect(key="ps_versions_receptionist").value == [fast.ref]
    at.text_input(key="ps_temps").input("0.2, 0.7")
    button(at, "Run suite").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Batch ") and "2 case(s) of tiny stored" in s.value for s in at.success)
    assert at.get("progress"), "the run shows a progress bar"
    summary = next(d.value for d in at.dataframe if "pass rate" in d.value.columns)
    assert list(summary["params"]) == ["temperature=0.2", "temperature=0.7"]
    assert list(summary["pass rate"]) == ["100%", "100%"]
    with app_store.session() as session:
        runs = session.scalars(select(EvalRun).where(EvalRun.suite == "tiny")).all()
        assert len(runs) == 2 and {r.created_by for r in runs} == {"rita"}
        assert session.scalars(select(EvalResult).where(EvalResult.eval_run_id.in_([r.id for r in runs]))).all()


def test_viewers_do_not_run_suites(app_store: Store) -> None:
    at = _personas("vera", PW)
    assert "Run suite" not in [b.label for b in at.button]
    assert "Suites" not in [t.label for t in at.tabs]


def test_the_edit_form_shows_the_selected_version(app_store: Store) -> None:
    """Switching persona or version refills the form: saving must never copy another version's fields."""

    new = save_version(app_store, "tutor", {"system_prompt": "Tutor, the newest version."}, actor=LOCAL_OPERATOR)
    old = f"tutor@{new.version - 1}"
    at = _personas()
    at.selectbox(key="personas_key").select("sales").run()
    assert at.text_area(key="pe_prompt_sales@1").value == get_version(app_store, "sales@1").system_prompt
    at.selectbox(key="personas_key").select("tutor").run()
    assert at.text_area(key=f"pe_prompt_{new.ref}").value == "Tutor, the newest version."
    assert at.text_input(key=f"pe_name_{new.ref}").value == new.name
    at.selectbox(key="personas_version_tutor").select(new.version - 1).run()
    assert at.text_area(key=f"pe_prompt_{old}").value == get_version(app_store, old).system_prompt


def _tabs_place(at: AppTest) -> int:
    """Where the tabs stand among the page's elements. The browser keeps the open tab (and a chosen file) only while
    this holds: tabs drawn at another place are new tabs, shown from the first one."""
    return next(
        i for i, n in at.main.children.items() if type(n) is Block and n.proto and n.proto.HasField("tab_container")
    )


def _word_diffs(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if "-background[" in m.value]


def test_the_diff_highlights_the_words_that_changed(app_store: Store) -> None:
    long = "Keep every answer to one sentence when the caller only asks for opening hours or directions. " * 3
    save_version(
        app_store,
        "assistant",
        {
            "system_prompt": "You are a helpful <b>phone</b> assistant. Answer clearly and very briefly. " + long,
            "greeting": "Hi, how can I help?",
        },
        actor=LOCAL_OPERATOR,
    )
    at = _personas()
    at.selectbox(key="personas_key").select("assistant").run()
    assert not at.exception, at.exception
    prompt, greeting = _word_diffs(at)
    # Changed words are highlighted, the rest is shown as typed: HTML and Markdown in a prompt stay text.
    assert prompt.startswith("You are a helpful :green-background[" + plain_markdown("<b>phone</b>")), prompt
    assert ":green-background[very] briefly" in prompt and "<b>" not in prompt
    assert greeting.startswith(":red-background[~~Hello~~]:green-background[Hi]"), greeting
    # The line diff is still there, wrapped rather than scrolled sideways.
    line_diffs = [c for c in at.code if c.language == "diff"]
    assert line_diffs and all(c.proto.wrap_lines for c in line_diffs)


def test_a_clone_is_compared_with_its_source(app_store: Store) -> None:
    clone_persona(app_store, "support@1", "support-b", "Support, variant B", actor=LOCAL_OPERATOR)
    save_version(app_store, "support-b", {"greeting": "Hi, support here. What went wrong?"}, actor=LOCAL_OPERATOR)
    at = _personas()
    at.selectbox(key="personas_key").select("support-b").run()
    source = at.selectbox(key="personas_diff_a_support-b")
    assert source.value == "support@1"  # "cloned from support@1": the clone is compared with where it came from
    assert source.options[:2] == ["support-b@2", "support-b@1"] and "receptionist@1" in source.options
    assert at.selectbox(key="personas_diff_b_support-b").value == 2
    fields = [m.value for m in at.markdown]
    assert "**greeting**" in fields and "**system_prompt**" not in fields

    # Any persona's version can be the "From" side.
    source.select("receptionist@1").run()
    assert not at.exception, at.exception
    assert {"**greeting**", "**system_prompt**"} <= {m.value for m in at.markdown}
    assert any("receptionist" in d for d in _word_diffs(at))


def test_choosing_a_card_to_import_stays_on_the_card_tab(app_store: Store) -> None:
    def card(name: str) -> bytes:
        data = {"name": name, "description": "", "first_mes": "Hi.", "system_prompt": f"You are {name}."}
        return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}).encode()

    at = _personas()
    place = _tabs_place(at)
    at.file_uploader(key="personas_import").set_value(("keeper.json", card("Tab keeper"), "application/json")).run()
    assert _tabs_place(at) == place
    button(at, "Import").click()
    at.run()
    # The message above the tabs does not move them: the Card tab stays open (tests/browser checks it in chromium).
    assert "Imported tab-keeper@1." in [s.value for s in at.success]
    assert _tabs_place(at) == place
    # Nor does its going away on the next run, when another card is chosen.
    at.file_uploader(key="personas_import").set_value(("other.json", card("Other keeper"), "application/json")).run()
    assert not at.success and _tabs_place(at) == place


def test_backend_and_model_are_picked_from_what_the_backends_offer(app_store: Store) -> None:
    create_persona(app_store, "pickers", "Pickers", system_prompt="You are a test persona.", actor=LOCAL_OPERATOR)
    at = _personas()
    at.selectbox(key="personas_key").select("pickers").run()
    backend = at.selectbox(key="pe_backend_pickers@1")
    assert backend.value == "(configured)" and {"(configured)", "embedded", "ollama"} <= set(backend.options)
    assert at.selectbox(key="pe_model_pickers@1_(configured)").value == "(backend default)"
    # The model list follows the backend at once, before anything is saved.
    backend.select("ollama").run()
    model = at.selectbox(key="pe_model_pickers@1_ollama")
    assert model.options == ["(backend default)", "smollm2:135m", "qwen2.5:0.5b"]
    model.select("qwen2.5:0.5b").run()
    at.text_input(key="pe_note_pickers@1").input("on ollama")
    button(at, "Save as a new version").click()
    at.run()
    assert not at.exception, at.exception
    assert "Saved pickers@2." in [s.value for s in at.success]
    saved = get_version(app_store, "pickers@2")
    assert (saved.backend, saved.model) == ("ollama", "qwen2.5:0.5b")
    assert at.selectbox(key="pe_backend_pickers@2").value == "ollama"
    assert at.selectbox(key="pe_model_pickers@2_ollama").value == "qwen2.5:0.5b"

    # "(configured)" and "(backend default)" store nothing: the settings decide at run time.
    at.selectbox(key="pe_backend_pickers@2").select("(configured)").run()
    button(at, "Save as a new version").click()
    at.run()
    saved = get_version(app_store, "pickers@3")
    assert (saved.backend, saved.model) == (None, None)

    # A version's own backend and model stay selectable when nothing lists them any more.
    save_version(app_store, "pickers", {"backend": "vllm", "model": "big-model"}, actor=LOCAL_OPERATOR)
    save_version(app_store, "pickers", {"backend": "ollama", "model": "llama3:70b"}, actor=LOCAL_OPERATOR)
    at = _personas()
    at.selectbox(key="personas_key").select("pickers").run()
    assert at.selectbox(key="pe_model_pickers@5_ollama").value == "llama3:70b"
    at.selectbox(key="personas_version_pickers").select(4).run()
    assert at.selectbox(key="pe_backend_pickers@4").value == "vllm"
    assert at.selectbox(key="pe_model_pickers@4_vllm").value == "big-model"
    assert not at.exception, at.exception


def test_a_suite_runs_versions_of_several_personas_in_one_grid(
    request: pytest.FixtureRequest, app_store: Store, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "hours.yaml").write_text(
        "name: hours\nturns:\n  - say: What are your opening hours?\n    expect:\n      - contains: hours\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("CALLBOT_SUITES_DIR", str(suites))
    get_settings.cache_clear()
    request.addfinalizer(get_settings.cache_clear)
    for key in ("grid-a", "grid-b"):  # on the Ollama-protocol server of conftest.py: no model needed
        create_persona(app_store, key, key, system_prompt="You answer calls.", backend="ollama", actor=LOCAL_OPERATOR)
    at = _personas()
    at.selectbox(key="personas_key").select("grid-a").run()
    versions = at.multiselect(key="ps_versions_grid-a")
    assert versions.value == ["grid-a@1"] and {"grid-b@1", "receptionist@1"} <= set(versions.options)
    versions.set_value(["grid-a@1", "grid-b@1"]).run()
    button(at, "Run suite").click()
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("2 case(s) of hours stored" in s.value for s in at.success)
    summary = next(d.value for d in at.dataframe if "pass rate" in d.value.columns)
    assert list(summary["persona"]) == ["grid-a@1", "grid-b@1"] and list(summary["pass rate"]) == ["100%", "100%"]
