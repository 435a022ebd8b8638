"""The Leaderboard page: the columns a researcher compares first come first; an empty pivot says how to fill it."""

from __future__ import annotations

from sqlalchemy import select

from callbot_core.store import Store
from callbot_core.store.models import EvalRun, Persona, PersonaVersion
from tests.app.helpers import PW, sign_in, titles, view


def test_votes_come_first_and_an_empty_pivot_says_how_to_fill_it(app_store: Store) -> None:
    with app_store.session() as s:
        version = s.scalar(
            select(PersonaVersion).join(Persona, Persona.id == PersonaVersion.persona_id)
            .where(Persona.key == "support", PersonaVersion.version == 1)
        )  # fmt: skip
        # A suite run that stored no assertions yet: a leaderboard row, but no pass rate to pivot.
        s.add(EvalRun(batch="empty", suite="support", persona_version_id=version.id, params=None, status="running"))

    at = sign_in("vera", PW)
    at.switch_page(view("leaderboard")).run()
    assert titles(at) == ["Leaderboard"], at.exception
    columns = list(at.dataframe[0].value.columns)
    assert columns[:7] == ["version", "params", "production", "votes", "comparisons", "pass_rate", "ttft_p50_ms"]
    assert len(at.dataframe) == 1  # no pivot of nothing
    assert any("No suite results yet" in i.value and "Suites tab" in i.value for i in at.info)
