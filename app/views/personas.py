"""Personas: versions (every edit is a new one), clone, archive, the production label, diffs, cards."""

from __future__ import annotations

import json
import re

import pandas as pd
import streamlit as st

from app.common import (
    DEFAULT_PERSONA,
    FAILED,
    allowed,
    backend_models,
    current_user,
    run_action,
    safe_markdown,
    service,
    settings,
    store,
    version_picker,
)
from app.rendering import plain_markdown
from callbot_core.backends.llm import available_backends
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.experiments.evals import load_suite, parse_suite, run_suite
from callbot_core.experiments.evals.runner import format_params
from callbot_core.experiments.evals.suite import suite_files
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.personas.cards import export_card, import_card
from callbot_core.personas.catalog import PersonaSummary, all_personas, parse_persona_ref
from callbot_core.personas.fields import KNOWLEDGE_K, MAX_TOKENS, TEMPERATURE, TOP_P
from callbot_core.personas.variables import prompt_variables
from callbot_core.personas.versions import (
    archive_persona,
    clone_persona,
    create_persona,
    diff_versions,
    get_version,
    list_versions,
    save_version,
    set_production,
    word_diff,
)
from callbot_core.settings import get_settings

FLASH = "personas_flash"
SELECT = "personas_select"  # (key, version) to show after the rerun that follows a change
DIFF_RESET = "personas_diff_reset"  # the persona whose Diff pickers go back to their defaults on this run
UPLOADED = "(uploaded file)"
CONFIGURED = "(configured)"  # no backend stored: the one configured when the version runs
BACKEND_DEFAULT = "(backend default)"  # no model stored: the backend's default model
CLONED = re.compile(r"^cloned from (\S+@\d+)$")  # the note clone_persona gives a clone's version 1

user = current_user()
NO_COLLECTION = "(none)"
# Collections a version may name; the engine checks the name, the page offers only those that exist.
collection_names = [c.name for c in KnowledgeBase(store(), get_settings()).collections(actor=user)]
may_edit = allowed("persona.edit")
may_promote = allowed("persona.promote")
st.title("Personas")


def _act(success: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run a change; on success redraw so every list shows it, with a message that survives the rerun."""
    result = run_action(fn, *args, **kwargs)
    if result is FAILED:
        return None
    st.session_state[FLASH] = success.format(result=result)
    if hasattr(result, "key") and hasattr(result, "version"):
        # Show what was just made or changed (a clone, a new version), not what was selected before.
        st.session_state[SELECT] = (result.key, result.version)
    st.rerun()


def _numbers(p: PersonaSummary) -> list[int]:
    """A persona's version numbers, newest first: 1..latest, as versions are only ever added (asked when not)."""
    if p.versions == p.latest:
        return list(range(p.latest, 0, -1))
    return [v.version for v in reversed(list_versions(store(), p.key))]


def _ref_order(ref: str) -> tuple[str, int]:
    key, number = parse_persona_ref(ref)
    return key, number or 0


def _keep_indent(line: str) -> str:
    """A line's leading spaces as no-break spaces: Markdown would drop them, or make an indented code block."""
    body = line.lstrip(" \t")
    return "\u00a0" * len(line[: len(line) - len(body)].replace("\t", "    ")) + body


def _marked(text: str, kind: str) -> str:
    """Changed words highlighted (removed ones struck through), the spaces around them left outside the mark."""
    core = text.strip()
    if not core:
        return text
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    shown = plain_markdown(core)
    mark = f":green-background[{shown}]" if kind == "added" else f":red-background[~~{shown}~~]"
    return lead + mark + trail


def _word_diff_markdown(old: str, new: str) -> str:
    """The word diff of two texts as Markdown: every character shown as typed (`plain_markdown`, never HTML), removed
    words struck through on red, added ones on green. Lines are the new text's (a removed line break shows as ↵);
    long lines wrap like any paragraph."""
    out: list[str] = []
    at_line_start = True
    for kind, text in word_diff(old, new):
        if kind == "removed":
            out.append(_marked(text.replace("\n", " ↵ ") if text.strip() else "↵" * text.count("\n"), kind))
            at_line_start = False
            continue
        for n, line in enumerate(text.split("\n")):
            if n:
                out.append("  \n")  # a hard line break; an empty line between two ends the paragraph
                at_line_start = True
            if not line:
                continue
            if at_line_start:
                line = _keep_indent(line)
                at_line_start = False
            out.append(plain_markdown(line) if kind == "same" else _marked(line, kind))
    return "".join(out)


# The message slot is drawn on every run, empty or not, so the tabs below keep their place on the page: the browser
# draws tabs that moved afresh, on their first tab (picking a card right after an import jumped to "Version").
flash_slot = st.empty()
if flash := st.session_state.pop(FLASH, None):
    flash_slot.success(flash)

personas = all_personas(store())
st.dataframe(
    pd.DataFrame(
        [
            {
                "key": p.key,
                "name": p.name,
                "latest": p.latest,
                "versions": p.versions,
                "production": str(p.production) if p.production else "",
                "archived": "yes" if p.archived else "",
                "description": p.description,
            }
            for p in personas
        ]
    ),
    hide_index=True,
    width="stretch",
    key="personas_table",
)

keys = [p.key for p in personas]
if pending := st.session_state.pop(SELECT, None):
    # Set before the selectboxes exist: Streamlit refuses changes to a drawn widget's state.
    st.session_state["personas_key"] = pending[0]
    st.session_state[f"personas_version_{pending[0]}"] = pending[1]
    st.session_state[DIFF_RESET] = pending[0]  # the Diff tab starts again from its defaults, the new version in "To"
if st.session_state.get("personas_key") not in keys:
    # The default lives in session state, not in index=: Streamlit warns when a widget gets both.
    st.session_state["personas_key"] = DEFAULT_PERSONA if DEFAULT_PERSONA in keys else keys[0]
key = st.selectbox("Persona", keys, key="personas_key")
summary = next(p for p in personas if p.key == key)
versions = list_versions(store(), key)
numbers = [v.version for v in reversed(versions)]
number = version_picker([v.version for v in versions], key=f"personas_version_{key}")
current = get_version(store(), f"{key}@{number}")

tags = []
if current.production:
    tags.append(":green-badge[production]")
if summary.archived:
    tags.append(":gray-badge[archived]")
st.markdown(f"### {safe_markdown(current.name)} · `{current.ref}` " + " ".join(tags))
st.caption(f"Saved {current.created_at:%Y-%m-%d %H:%M}" + (f" · {safe_markdown(current.note)}" if current.note else ""))

# A tab the role cannot use is not shown at all (the engine refuses its actions anyway).
may_run_suites = allowed("suite.run")
tab_names = [
    "Version", *(["Edit"] if may_edit else []), "Diff", *(["Manage"] if may_edit else []), "Card",
    *(["Suites"] if may_run_suites else []),
]  # fmt: skip
# The open tab lives in the browser only: nothing drawn above the tabs may come and go (see `flash_slot`).
tabs = dict(zip(tab_names, st.tabs(tab_names), strict=True))
view_tab, diff_tab, card_tab = tabs["Version"], tabs["Diff"], tabs["Card"]

with view_tab:
    st.markdown("**System prompt**")
    st.code(current.system_prompt, language=None, wrap_lines=True)
    variables = prompt_variables(current.system_prompt)
    if variables:
        st.caption("Variables: " + ", ".join(f"`{{{{{v}}}}}`" for v in variables))
    st.markdown("**Greeting**")
    st.markdown(safe_markdown(current.greeting or "—"))
    st.dataframe(
        pd.DataFrame(
            [
                ("temperature", current.temperature),
                ("top_p", current.top_p),
                ("max tokens", current.max_tokens),
                ("stop words", ", ".join(current.stop_words)),
                ("backend", current.backend or "(configured)"),
                ("model", current.model or "(backend default)"),
                ("voice", current.voice or ""),
                ("tags", ", ".join(current.tags)),
                ("knowledge collection", current.knowledge_collection or "(none)"),
                ("passages per turn (k)", current.knowledge_k),
                (
                    "low-relevance threshold",
                    "(configured)" if current.knowledge_threshold is None else current.knowledge_threshold,
                ),
            ],  # fmt: skip
            columns=["setting", "value"],
        ).astype(str),
        hide_index=True,
    )
    st.dataframe(
        pd.DataFrame(
            [{"version": v.version, "saved": f"{v.created_at:%Y-%m-%d %H:%M}", "note": v.note} for v in versions]
        ),
        hide_index=True,
        width="stretch",
    )

if may_edit:
    with tabs["Edit"]:
        st.caption(f"Saving makes version {summary.latest + 1}; {current.ref} stays as it is and remains usable.")

        def _pe(field: str) -> str:
            return f"pe_{field}_{current.ref}"

        # Backend and model stand outside the form: the model list depends on the backend, and a widget inside a
        # form does not rerun the page until the form is submitted. Keyed by version (and the model by backend
        # too), so another version's or backend's choice never carries over.
        registered = available_backends()
        backends = [CONFIGURED, *registered]
        if current.backend and current.backend not in backends:
            backends.append(current.backend)  # a version's own backend stays selectable
        c4, c5 = st.columns(2)
        backend_choice = c4.selectbox(
            "Backend",
            backends,
            index=backends.index(current.backend or CONFIGURED),
            key=_pe("backend"),
            help=f"Saved with the form below. {CONFIGURED}: the backend configured when the version runs.",
        )
        backend = None if backend_choice == CONFIGURED else backend_choice
        serving = backend or settings().llm_backend
        models, models_error = backend_models(serving)
        model_options = [BACKEND_DEFAULT, *models]
        own_model = current.model if backend == current.backend else None
        if own_model and own_model not in model_options:
            model_options.append(own_model)  # so is its own model, listed or not
        model_choice = c5.selectbox(
            "Model",
            model_options,
            index=model_options.index(own_model or BACKEND_DEFAULT),
            key=f"{_pe('model')}_{backend_choice}",
            help=f"The models the backend offers now. {BACKEND_DEFAULT}: the backend's default model.",
        )
        model = None if model_choice == BACKEND_DEFAULT else model_choice
        if models_error:
            st.caption(f"{safe_markdown(serving)} lists no models now: {safe_markdown(models_error)}")

        # Keys carry the version: Streamlit keeps a keyed widget's state when its default changes, so a shared
        # key would keep showing (and save) the fields of the version selected before.
        with st.form(f"personas_edit_{current.ref}"):
            n1, n2 = st.columns([1, 2])
            name = n1.text_input("Name", summary.name, key=_pe("name"))
            description = n2.text_input("Description", summary.description, key=_pe("description"))
            system_prompt = st.text_area("System prompt", current.system_prompt, height=180, key=_pe("prompt"))
            greeting = st.text_input("Greeting", current.greeting, key=_pe("greeting"))
            c1, c2, c3 = st.columns(3)
            temperature = c1.number_input(
                "Temperature", TEMPERATURE.low, TEMPERATURE.high, float(current.temperature), 0.05, key=_pe("temp")
            )
            top_p = c2.number_input("Top p", TOP_P.input_min, TOP_P.high, float(current.top_p), 0.01, key=_pe("top_p"))
            max_tokens = c3.number_input(
                "Max tokens", int(MAX_TOKENS.low), int(MAX_TOKENS.high), int(current.max_tokens), key=_pe("max_tokens")
            )
            stop = st.text_input("Stop words (comma separated)", ", ".join(current.stop_words), key=_pe("stop"))
            c6, c7 = st.columns([1, 2])
            voice = c6.text_input("Voice", current.voice or "", key=_pe("voice"))
            tag_text = c7.text_input("Tags (comma separated)", ", ".join(current.tags), key=_pe("tags"))
            k1, k2, k3 = st.columns([2, 1, 1])
            collection = k1.selectbox(
                "Knowledge collection", [NO_COLLECTION, *collection_names],
                index=([NO_COLLECTION, *collection_names].index(current.knowledge_collection)
                       if current.knowledge_collection in collection_names else 0),
                key=_pe("collection"), help="Each turn retrieves passages from it; the reply cites them",
            )  # fmt: skip
            knowledge_k = k2.number_input(
                "Passages (k)", int(KNOWLEDGE_K.low), int(KNOWLEDGE_K.high), int(current.knowledge_k), key=_pe("k")
            )
            threshold = k3.number_input(
                "Low relevance under", 0.0, 1.0,
                float(current.knowledge_threshold if current.knowledge_threshold is not None
                      else get_settings().knowledge_low_relevance), 0.05, key=_pe("threshold"),
            )  # fmt: skip
            note = st.text_input("What changed", key=_pe("note"))
            if st.form_submit_button("Save as a new version"):
                _act(
                    "Saved {result.ref}.",
                    save_version,
                    store(),
                    key,
                    {
                        # Name and description belong to the persona, not to a version: they change for all.
                        "name": name,
                        "description": description,
                        "system_prompt": system_prompt,
                        "greeting": greeting,
                        "temperature": temperature,
                        "top_p": top_p,
                        "max_tokens": int(max_tokens),
                        "stop_words": [s.strip() for s in stop.split(",") if s.strip()],
                        "backend": backend,
                        "model": model,
                        "voice": voice.strip() or None,
                        "tags": [t.strip() for t in tag_text.split(",") if t.strip()],
                        "knowledge_collection": None if collection == NO_COLLECTION else collection,
                        "knowledge_k": int(knowledge_k),
                        # Left to the configured default unless it was set or is changed here.
                        "knowledge_threshold": None
                        if current.knowledge_threshold is None
                        and abs(threshold - get_settings().knowledge_low_relevance) < 1e-9
                        else float(threshold),
                    },
                    actor=user,
                    note=note,
                )

# Every version of every persona, this persona's first (newest first): what "From" and a suite grid choose from.
all_refs = [f"{key}@{n}" for n in numbers] + [
    f"{p.key}@{n}" for p in personas if p.key != key for n in _numbers(p)
]  # fmt: skip

with diff_tab:
    # A clone is compared with the version it was cloned from ("cloned from key@N"), other personas with their
    # previous version; any version of any persona can be picked as "From".
    cloned = CLONED.match(versions[0].note)
    source = cloned.group(1) if cloned and cloned.group(1) in all_refs else None
    diff_a, diff_b = f"personas_diff_a_{key}", f"personas_diff_b_{key}"
    # Defaults set in session state, not with index=: a browser keeps showing its own choice over a new default.
    reset = st.session_state.pop(DIFF_RESET, None) == key
    if reset or st.session_state.get(diff_a) not in all_refs:
        st.session_state[diff_a] = source or f"{key}@{numbers[min(1, len(numbers) - 1)]}"
    if reset or st.session_state.get(diff_b) not in numbers:
        st.session_state[diff_b] = numbers[0]
    d1, d2 = st.columns(2)
    ref_a = d1.selectbox("From", all_refs, key=diff_a)
    b = d2.selectbox("To", numbers, key=diff_b)
    if ref_a == f"{key}@{b}":
        st.info(
            "This persona has one version: pick another persona's version as From to compare."
            if len(numbers) < 2
            else "Pick two different versions to compare."
        )
    else:
        changes = diff_versions(store(), ref_a, f"{key}@{b}")
        if not changes:
            st.info("These versions are the same.")
        elif any(change.diff for change in changes):
            st.caption("Removed words are struck through on red, added words are on green.")
        for change in changes:
            st.markdown(f"**{change.field}**")
            if change.diff:
                with st.container(border=True):
                    st.markdown(_word_diff_markdown(change.old or "", change.new or ""))
                with st.expander("Line diff"):
                    st.code(change.diff, language="diff", wrap_lines=True)
            else:
                st.markdown(f"`{change.old}` → `{change.new}`")

if may_edit:
    with tabs["Manage"]:
        if (
            may_promote
            and not current.production
            and st.button(f"Make {current.ref} the production version", key="personas_promote")
        ):
            _act("{result.ref} is now production.", set_production, store(), current.ref, actor=user)
        with st.form("personas_clone", clear_on_submit=True):
            st.markdown(f"**Clone {current.ref}**")
            new_key = st.text_input("New key", key="pc_key")
            new_name = st.text_input("New name", key="pc_name")
            if st.form_submit_button("Clone"):
                _act("Created {result.ref}.", clone_persona, store(), current.ref, new_key, new_name, actor=user)
        label = "Restore from the archive" if summary.archived else "Archive this persona"
        if st.button(label, key="personas_archive"):
            _act(f"{key} {'restored' if summary.archived else 'archived'}.", archive_persona, store(), key,
                 archived=not summary.archived, actor=user)  # fmt: skip
        with st.form("personas_create", clear_on_submit=True):
            st.markdown("**New persona**")
            n_key = st.text_input("Key", key="pn_key")
            n_name = st.text_input("Name", key="pn_name")
            n_description = st.text_input("Description", key="pn_description")
            n_prompt = st.text_area("System prompt", key="pn_prompt")
            n_greeting = st.text_input("Greeting", key="pn_greeting")
            if st.form_submit_button("Create persona"):
                _act("Created {result.ref}.", create_persona, store(), n_key, n_name, n_description,
                     system_prompt=n_prompt, greeting=n_greeting, actor=user)  # fmt: skip

with card_tab:
    card = json.dumps(export_card(store(), current.ref), indent=2, ensure_ascii=False)
    st.download_button(f"Download {current.ref} as a Character Card V2 (JSON)", card.encode("utf-8"),
                       f"{current.key}-v{current.version}.json", "application/json", key="personas_card")  # fmt: skip
    if may_edit:
        upload = st.file_uploader("Import a Character Card V2 (JSON)", type=["json"], key="personas_import")
        if upload is not None and st.button("Import", key="personas_import_go"):
            _act("Imported {result.ref}.", import_card, store(), upload.getvalue(), actor=user)


def _temperatures(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise InvalidInput(f"Temperatures must be numbers separated by commas, e.g. 0.2, 0.7 (not {text!r})") from None
    if any(not 0 <= v <= 2 for v in values):
        raise InvalidInput("Temperatures must be between 0 and 2")
    return values


if may_run_suites:
    with tabs["Suites"]:
        st.caption(
            f"Run a scenario suite against versions of {key} and of any other persona, in one grid: every version × "
            "temperature × repeat is one case."
        )
        suites = suite_files(get_settings().suites_dir)
        files = list(suites)
        choice = st.selectbox("Suite", [*files, UPLOADED], key="ps_suite")
        upload = None
        if choice == UPLOADED:
            upload = st.file_uploader("Suite file (YAML)", type=["yaml", "yml"], key="ps_upload")
        chosen = st.multiselect("Versions", all_refs, default=[current.ref], key=f"ps_versions_{key}")
        c1, c2 = st.columns(2)
        temps_text = c1.text_input("Temperatures (comma separated; empty: the version's own)", key="ps_temps")
        repeat = c2.number_input("Repeat", 1, 20, 1, key="ps_repeat")
        if st.button("Run suite", key="ps_run"):
            try:
                if choice == UPLOADED:
                    if upload is None:
                        raise InvalidInput("Upload a suite file first")
                    suite = parse_suite(upload.getvalue(), source=upload.name)
                else:
                    suite = load_suite(suites[choice])
                if not chosen:
                    raise InvalidInput("Pick at least one version")
                temps = _temperatures(temps_text)
                bar = st.progress(0.0, text=f"Running {safe_markdown(suite.name)}…")

                def _progress(done: int, total: int) -> None:
                    bar.progress(
                        done / total if total else 1.0,
                        text=f"Running {safe_markdown(suite.name)}: {done}/{total} cases",
                    )

                batch = run_suite(
                    service(),
                    suite,
                    sorted(chosen, key=_ref_order),
                    params_grid={"temperature": temps} if temps else None,
                    repeat=int(repeat),
                    actor=user,
                    progress=_progress,
                )
            except CallbotError as exc:
                st.error(str(exc))
            else:
                st.success(f"Batch {batch.batch}: {len(batch.cells)} case(s) of {safe_markdown(suite.name)} stored.")
                # By version, then parameters: cells that run side by side finish in any order.
                rows = sorted(batch.summary(), key=lambda r: (_ref_order(r.persona), format_params(r.params)))
                st.dataframe(
                    pd.DataFrame([r.display() for r in rows]),
                    hide_index=True,
                    width="stretch",
                    key="ps_summary",
                )
                for cell in batch.cells:
                    if cell.error:
                        st.error(f"run {cell.run_id} ({cell.persona}, {format_params(cell.params)}): {cell.error}")
