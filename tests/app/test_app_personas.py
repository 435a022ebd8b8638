"""The Personas page through AppTest: edit makes a new version, diff, production label, clone, cards."""

from __future__ import annotations

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.personas.versions import get_version, list_versions, production_version
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

    from callbot_core.personas.versions import save_version
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
    assert at.multiselect(key="ps_versions_receptionist").value == [fast.version]
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
    from callbot_core.personas.versions import save_version

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
