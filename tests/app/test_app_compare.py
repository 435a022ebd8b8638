"""The Compare page through AppTest: start a comparison on the fake Ollama, send a turn, vote, blind mode."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from callbot_core.conversations.transcripts import get_conversation
from callbot_core.experiments.comparisons import get_comparison, list_comparisons
from callbot_core.store import Store
from tests.app.helpers import PW, button, known_pages_error, sign_in, titles, view

REPLY = "Our hours are 8 to 6."


def _start(app_store: Store, *, blind: bool) -> AppTest:
    at = sign_in("rita", PW)
    at.switch_page(view("compare")).run()
    assert titles(at) == ["Compare"], at.exception
    # receptionist@1 (the default persona, its only version) twice; B at temperature 0.2.
    at.number_input(key="compare_temperature_1").set_value(0.2).run()
    at.selectbox(key="compare_backend").select("ollama").run()
    assert at.selectbox(key="compare_model_ollama").value == "smollm2:135m"
    if blind:
        at.toggle(key="compare_blind").set_value(True).run()
    button(at, "Start comparison").click()
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    at.chat_input(key="compare_input").set_value("When are you open?").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    return at


def _replies(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value == REPLY]


def _headers(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**Variant")]


def test_compare_two_variants_side_by_side_and_vote(app_store: Store) -> None:
    at = _start(app_store, blind=False)
    assert _replies(at) == [REPLY, REPLY]
    assert any("TTFT" in m.value and "words" in m.value for m in at.markdown)
    headers = _headers(at)
    assert headers[0].startswith("**Variant A · receptionist@1**")
    assert headers[1].startswith("**Variant B · receptionist@1 · temperature=0.2**")

    button(at, "Prefer B").click()
    at.run()
    assert not at.exception and not at.error
    assert any("preferred" in h for h in _headers(at)[1:])
    cid = at.session_state["compare_comparison_id"]
    detail = get_comparison(app_store, cid)
    assert [v.votes for v in detail.variants] == [0, 1]
    assert [v.params for v in detail.variants] == [{}, {"temperature": 0.2}]

    # Leaving it for a new one ends its conversations: nothing stays active for ever.
    button(at, "New comparison").click()
    at.run()
    assert not at.exception and not at.error
    assert "compare_comparison_id" not in at.session_state
    assert {get_conversation(app_store, v.conversation_id).row.status for v in detail.variants} == {"ended"}


def test_blind_mode_hides_which_variant_is_which_until_the_vote(app_store: Store) -> None:
    at = _start(app_store, blind=True)
    detail = get_comparison(app_store, at.session_state["compare_comparison_id"])
    assert detail.blind
    # The caller's question is on the page, above the columns.
    assert any(m.value == "When are you open?" for m in at.markdown)
    # How the variants ran: the fake Ollama serves requests side by side, so they ran at the same time.
    assert any("at the same time" in c.value for c in at.caption), [c.value for c in at.caption]
    assert _replies(at) == [REPLY, REPLY]
    assert [h.split("**")[1] for h in _headers(at)] == ["Variant A", "Variant B"]
    assert not any("receptionist@" in m.value or "temperature" in m.value for m in at.markdown)

    button(at, "Prefer A").click()
    at.run()
    assert not at.exception and not at.error
    # Revealed after the vote, as stored: the columns are in the comparison's (shuffled) order, and each says
    # which of the variants set up it is.
    headers = _headers(at)
    for header, variant in zip(headers, detail.variants, strict=True):
        assert f"Variant {variant.label} · {variant.describe()}" in header, (header, variant)
        assert f"set up as variant {variant.setup_position + 1}" in header, header
    assert "preferred" in headers[0] and "preferred" not in headers[1]
    assert get_comparison(app_store, detail.id).tally() == {detail.variants[0].id: 1, detail.variants[1].id: 0}


def test_two_identical_variants_are_refused(app_store: Store) -> None:
    at = sign_in("rita", PW)
    at.switch_page(view("compare")).run()
    before = len(list_comparisons(app_store, 1000))
    # The form starts with receptionist@1 twice at its own temperature: the same variant twice.
    at.selectbox(key="compare_backend").select("ollama").run()
    button(at, "Start comparison").click()
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "Variants 1 and 2 are the same: receptionist@1 with the same parameters on ollama · smollm2:135m. "
        "Change the persona, the version or a parameter of one of them"
    ]
    assert "compare_comparison_id" not in at.session_state
    assert len(list_comparisons(app_store, 1000)) == before


def test_viewers_cannot_open_compare(app_store: Store) -> None:
    at = sign_in("vera", PW)
    assert "compare.py'" not in known_pages_error(at, view("compare")).split("Known pages")[1]


def test_the_page_says_variants_on_the_embedded_model_run_one_after_another(app_store: Store) -> None:
    at = sign_in("rita", PW)
    at.switch_page(view("compare")).run()
    # A second persona: not the same variant twice.
    personas = at.selectbox(key="compare_persona_1")
    personas.select_index(next(i for i, o in enumerate(personas.options) if "(receptionist)" not in o)).run()
    assert at.selectbox(key="compare_backend").value == "embedded"
    button(at, "Start comparison").click()
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    # No turn is needed to say how turns will run: the embedded model answers one request at a time.
    notes = [c.value for c in at.caption if "one after another" in c.value]
    assert len(notes) == 1 and "Variant A and Variant B run one after another" in notes[0], notes
    assert "embedded answers one request at a time" in notes[0]


def test_a_run_waits_for_the_turn_the_run_before_it_was_storing(app_store: Store) -> None:
    # A click while replies stream starts the next run at once, in a new thread, while the streaming run is still
    # storing its turns (Streamlit's fast reruns). Stand-in for that run: a thread that stores a turn a moment after
    # the next run has begun. The page must draw that turn, not a comparison without it.
    import threading
    import time

    from callbot_core.access.signin import authenticate
    from callbot_core.conversations.service import ConversationService
    from callbot_core.experiments.comparisons import stream_turn
    from callbot_core.settings import get_settings

    at = _start(app_store, blind=False)
    cid = at.session_state["compare_comparison_id"]
    rita = authenticate(app_store, "rita", PW)
    assert rita is not None
    stored = threading.Event()
    at.session_state["compare_live_turn"] = stored

    def the_streaming_run() -> None:
        time.sleep(0.5)  # the next run has begun
        with stream_turn(ConversationService(app_store, get_settings()), cid, "And on Saturdays?", actor=rita) as run:
            for _ in run:
                pass
        stored.set()

    threading.Thread(target=the_streaming_run, daemon=True).start()
    at.run()
    assert not at.exception
    assert [m.value for m in at.markdown if m.value == "And on Saturdays?"] == ["And on Saturdays?"]
    assert _replies(at) == [REPLY] * 4
    assert "compare_live_turn" not in at.session_state
