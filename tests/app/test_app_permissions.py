"""The app over the engine's permissions: a refusal shows as one error line, and each role sees only what it may use
(the engine refuses the rest anyway: tests/engine/test_permissions.py)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from callbot_core.store import Store
from tests.app.helpers import ADMIN_PW, PW, known_pages_error, sign_in, titles, view


def _refused_page() -> None:
    import streamlit as st

    from app.common import FAILED, run_action
    from callbot_core.access.permissions import OperatorActor, require

    result = run_action(require, OperatorActor(username="vera", role="viewer"), "persona.promote")
    st.write("refused" if result is FAILED else "done")


def test_run_action_shows_a_refusal_as_one_line_and_the_page_goes_on() -> None:
    at = AppTest.from_function(_refused_page).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "vera (viewer) may not move a persona's production label; allowed roles: admin, researcher"
    ]
    assert [m.value for m in at.markdown] == ["refused"]


def test_viewers_do_not_see_the_researcher_pages(app_store: Store) -> None:
    vera = sign_in("vera", PW)
    for page in ("chat", "compare", "admin"):
        assert f"{page}.py'" not in known_pages_error(vera, view(page)).split("Known pages")[1]


def test_each_role_sees_the_report_form_it_may_use(app_store: Store) -> None:
    def report_inputs(username: str, password: str) -> list[str]:
        at = sign_in(username, password)
        at.switch_page(view("reports")).run()
        assert titles(at) == ["Reports"] and not at.exception, at.exception
        return [t.label for t in at.text_input] + [s.label for s in at.selectbox if s.key.startswith("reports_param")]

    assert report_inputs("vera", PW) == []  # viewers read runs, they do not start them
    # The persona is picked from the store's personas; another database is an admin's call.
    assert report_inputs("rita", PW) == ["since", "until", "persona"]
    assert report_inputs("admin", ADMIN_PW) == ["since", "until", "database_url", "persona"]
