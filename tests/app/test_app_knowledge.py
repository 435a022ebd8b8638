"""The Knowledge page through AppTest: collections and documents listed, uploads, deletion, search with the
low-relevance warning, stored evaluations, what a viewer sees, markup in file names and passages shown literally,
and citations under a Chat reply of a persona that answers from a collection.

No model runs here: the app's embedder is the bag-of-words stand-in of tests/knowledge/conftest.py, registered
through the real registry in this process (AppTest runs the page in the test's process) and chosen with
CALLBOT_EMBEDDER. The vectors live in the real embedded Chroma under the app's runtime folder. Each test ingests into
a collection of its own in the module's one store.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import pytest
import streamlit as st
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from app.rendering import plain_markdown
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.embeddings import embedders
from callbot_core.backends.vectors.chroma import close_persistent_clients
from callbot_core.errors import PermissionDenied
from callbot_core.knowledge.evaluation import evaluate, list_evals, parse_questions
from callbot_core.knowledge.index import KnowledgeBase, SourceFile
from callbot_core.personas.versions import save_version
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.app.helpers import PW, button, sign_in, titles, view
from tests.knowledge.conftest import BOW, CLINIC_TEXTS, BagOfWords

UNRELATED = "Quantum chromodynamics lecture timetable"
JPEG_AS_PDF = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 64
MARKUP_NAME = "**bold**<img src=x onerror=alert(1)>.txt"
MARKUP_TEXT = (
    "Opening hours of the ward: <script>window.__pwned=1</script> **loud** [a link](http://example.invalid) "
    "![pixel](http://example.invalid/p.png) :red[red] $x^2$"
)
# Streamlit renders Markdown with GFM; raw HTML is never rendered by it, but is checked here as well.
_MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])


@pytest.fixture(scope="module")
def kb_store(app_store: Store) -> Iterator[Store]:
    """The app store, with the app's embedder the bag-of-words stand-in (the engine caches are rebuilt so the app
    reads the setting)."""
    model = BagOfWords()
    embedders.register(BOW, lambda settings: model)
    mp = pytest.MonkeyPatch()
    mp.setenv("CALLBOT_EMBEDDER", BOW)
    get_settings.cache_clear()
    st.cache_resource.clear()
    yield app_store
    mp.undo()
    embedders.unregister(BOW)
    get_settings.cache_clear()
    st.cache_resource.clear()
    close_persistent_clients()


@pytest.fixture
def kb(kb_store: Store) -> KnowledgeBase:
    return KnowledgeBase(kb_store, get_settings())


def _ingest(kb: KnowledgeBase, collection: str, texts: dict[str, str]) -> None:
    outcomes = kb.ingest(collection, [SourceFile(n, data=t.encode()) for n, t in texts.items()], actor=LOCAL_OPERATOR)
    assert all(o.ok for o in outcomes), outcomes


def _knowledge(username: str = "rita", collection: str | None = None) -> AppTest:
    at = sign_in(username, PW)
    at.switch_page(view("knowledge")).run()
    assert titles(at) == ["Knowledge"], at.exception
    assert not at.exception, at.exception
    if collection is not None:
        at.selectbox(key="knowledge_pick").select(collection).run()
        assert not at.exception, at.exception
    return at


def _tab(at: AppTest, label: str):  # type: ignore[no-untyped-def]
    return next(t for t in at.tabs if t.label == label)


def _documents(at: AppTest) -> list[str]:
    """The sources in the Documents tab's table (none when it shows no table)."""
    tables = _tab(at, "Documents").dataframe
    return list(tables[0].value["source"]) if tables else []


def _search(at: AppTest, question: str) -> AppTest:
    box = next(t for t in _tab(at, "Search").text_input if t.label == "Question")
    box.input(question)
    button(at, "Search").click()
    at.run()
    assert not at.exception, at.exception
    return at


def _hits(at: AppTest) -> list[str]:
    return [m.value for m in _tab(at, "Search").markdown if re.match(r"\*\*\d+\.\*\* ", m.value)]


def _shown_as(markdown: str) -> str:
    """What a reader sees of a Markdown string: rendered, then stripped of tags. Fails on any element the text
    would have made (emphasis, links, images, raw HTML)."""
    rendered = _MARKDOWN.render(markdown)
    for tag in ("<strong", "<em", "<a ", "<img", "<script", "<code"):
        assert tag not in rendered, f"{markdown!r} renders as markup: {rendered!r}"
    return html.unescape(re.sub(r"<[^>]+>", "", rendered)).strip()


# -- listing -------------------------------------------------------------------------------------------------


def test_no_collections_shows_the_empty_state(kb: KnowledgeBase) -> None:
    # First in the module: the store has no collection yet.
    at = _knowledge()
    assert [i.value for i in at.info] == ["No collections yet. Name one above and upload documents into it."]
    assert at.selectbox(key="knowledge_pick").options == []
    assert at.selectbox(key="knowledge_pick").value is None
    assert not at.tabs and not at.dataframe  # nothing to show until a collection is named
    viewer = _knowledge("vera")
    assert [i.value for i in viewer.info] == ["No collections yet."]
    assert "or a new one" not in [t.label for t in viewer.text_input]

    # A collection made meanwhile (another user, the CLI) is picked on the next run, not left as a blank picker.
    _ingest(kb, "clinic", CLINIC_TEXTS)
    at.run()
    assert at.selectbox(key="knowledge_pick").value == "clinic"
    assert not at.info and _documents(at) == ["fees.txt", "hours.md", "parking.txt"]


def test_collections_and_documents_ingested_by_the_engine_are_listed(kb: KnowledgeBase) -> None:
    _ingest(kb, "clinic", CLINIC_TEXTS)
    _ingest(kb, "other", {"lift.txt": "The lift is next to the stairs."})
    at = _knowledge(collection="clinic")
    listed = at.dataframe[0].value
    assert list(listed["collection"]) == ["clinic", "other"]
    assert list(listed["documents"]) == [3, 1]
    assert list(listed["embedder"]) == [f"{BOW} (256)"] * 2
    assert [t.label for t in at.tabs] == ["Documents", "Search", "Evaluation"]
    assert _documents(at) == ["fees.txt", "hours.md", "parking.txt"]
    docs = _tab(at, "Documents").dataframe[0].value
    assert list(docs["format"]) == ["txt", "md", "txt"] and all(docs["by"] == "cli")
    assert list(docs["pages"]) == ["–"] * 3  # not "None": these formats have no pages

    at.selectbox(key="knowledge_pick").select("other").run()
    assert _documents(at) == ["lift.txt"]


# -- search --------------------------------------------------------------------------------------------------


def test_search_shows_the_best_hit_and_warns_of_low_relevance(kb: KnowledgeBase) -> None:
    _ingest(kb, "clinic", CLINIC_TEXTS)  # unchanged when an earlier test ingested it already
    at = _knowledge(collection="clinic")
    _search(at, "Is parking free in the courtyard?")
    hits = _hits(at)
    assert hits, [m.value for m in at.markdown]
    best = re.fullmatch(r"\*\*1\.\*\* (.+) · similarity (0\.\d\d|1\.00)", hits[0])
    assert best and best.group(1) == plain_markdown("parking.txt"), hits[0]
    assert float(best.group(2)) >= 0.35
    assert not at.warning, [w.value for w in at.warning]
    assert CLINIC_TEXTS["parking.txt"] in [t.value for t in _tab(at, "Search").text]

    _search(at, UNRELATED)
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and warnings[0].startswith("Low relevance: the best similarity is 0."), warnings
    assert "under 0.35" in warnings[0]


def test_a_viewer_sees_documents_and_search_but_cannot_change_anything(kb: KnowledgeBase) -> None:
    _ingest(kb, "clinic", CLINIC_TEXTS)
    at = _knowledge("vera", collection="clinic")
    assert _documents(at) == ["fees.txt", "hours.md", "parking.txt"]
    assert not at.file_uploader, "a viewer is offered an upload"
    labels = [b.label for b in at.button]
    assert "Ingest" not in labels and "Delete" not in labels and "Evaluate" not in labels, labels
    assert not at.multiselect and "or a new one" not in [t.label for t in at.text_input]
    _search(at, "Is parking free in the courtyard?")
    assert _hits(at)[0].startswith(f"**1.** {plain_markdown('parking.txt')} ·")

    # Hidden in the page, and refused by the engine anyway.
    vera = at.session_state["cb_user"]
    with pytest.raises(PermissionDenied):
        kb.ingest("clinic", [SourceFile("x.txt", data=b"words here")], actor=vera)
    with pytest.raises(PermissionDenied):
        kb.delete_document("clinic", "fees.txt", actor=vera)
    assert [d.source for d in kb.documents("clinic", actor=LOCAL_OPERATOR)] == ["fees.txt", "hours.md", "parking.txt"]


# -- upload and delete ---------------------------------------------------------------------------------------


def test_upload_ingests_good_files_and_names_the_bad_one(kb: KnowledgeBase) -> None:
    at = _knowledge()
    at.text_input(key="knowledge_new").input("uploads").run()
    assert button(at, "Ingest").disabled  # nothing chosen yet
    uploader = at.file_uploader[0]
    uploader.upload("notes.txt", b"The lift is next to the stairs on every floor.", "text/plain")
    uploader.upload("scan.pdf", JPEG_AS_PDF, "application/pdf")
    at.run()
    button(at, "Ingest").click()
    at.run()
    assert not at.exception, at.exception
    assert [_shown_as(s.value) for s in at.success] == ["ingested: notes.txt (1 passages)"]
    assert [_shown_as(e.value) for e in at.error] == ["scan.pdf: not a PDF (the bytes are a JPEG image)"]
    assert _documents(at) == ["notes.txt"]
    assert [d.source for d in kb.documents("uploads", actor=LOCAL_OPERATOR)] == ["notes.txt"]
    assert not at.file_uploader[0].value, "the uploader still holds the files just ingested"
    assert "uploads" in list(at.dataframe[0].value["collection"])
    # The new collection is now the one picked, and the name box is empty for the next new one.
    assert at.selectbox(key="knowledge_pick").value == "uploads"
    assert at.text_input(key="knowledge_new").value == ""

    at.run()  # the outcome lines belong to that upload only
    assert not at.success and not at.error


def test_deleting_documents_from_the_page_removes_them(kb: KnowledgeBase) -> None:
    _ingest(kb, "deletions", {"a.txt": "Alpha words for the first file.", "b.txt": "Beta words for the second."})
    at = _knowledge(collection="deletions")
    assert button(at, "Delete").disabled
    at.multiselect(key="knowledge_doomed").select("a.txt").run()
    button(at, "Delete").click()
    at.run()
    assert not at.exception, at.exception
    assert _documents(at) == ["b.txt"]
    assert [d.source for d in kb.documents("deletions", actor=LOCAL_OPERATOR)] == ["b.txt"]
    assert at.multiselect(key="knowledge_doomed").value == []

    at.multiselect(key="knowledge_doomed").select("b.txt").run()
    button(at, "Delete").click()
    at.run()
    assert not at.exception, at.exception
    assert _documents(at) == []
    assert "This collection has no documents." in [c.value for c in _tab(at, "Documents").caption]
    assert kb.documents("deletions", actor=LOCAL_OPERATOR) == []


# -- evaluation ----------------------------------------------------------------------------------------------

QUESTIONS = "\n".join(
    [
        '{"question": "Is parking free in the courtyard?", "expected_sources": ["parking.txt"]}',
        '{"question": "What is the no-show fee for a missed appointment?", "expected_sources": ["fees.txt"]}',
        '{"question": "' + UNRELATED + '", "expected_sources": []}',
    ]
)


def test_the_evaluation_tab_lists_stored_runs_and_runs_a_question_file(kb: KnowledgeBase) -> None:
    _ingest(kb, "evals", CLINIC_TEXTS)
    at = _knowledge(collection="evals")
    assert "No retrieval evaluations of this collection yet." in [c.value for c in _tab(at, "Evaluation").caption]

    run = evaluate(kb, "evals", parse_questions(QUESTIONS), actor=LOCAL_OPERATOR, k=3, questions_file="q.jsonl")
    at.run()
    table = _tab(at, "Evaluation").dataframe[0].value
    assert list(table["questions file"]) == ["q.jsonl"] and list(table["k"]) == [3]
    assert list(table["recall@k"]) == [f"{run.recall_at_k:.3f}"] and list(table["MRR"]) == [f"{run.mrr:.3f}"]
    assert list(table["unanswerable flagged"]) == ["1/1"] and list(table["by"]) == ["cli"]

    # A question file run from the page is stored and listed, newest first.
    at.file_uploader(key="knowledge_questions").upload("mine.jsonl", QUESTIONS.encode(), "application/jsonl")
    at.run()
    button(at, "Evaluate").click()
    at.run()
    assert not at.exception, at.exception
    assert [s.value for s in at.success] == ["recall@5 1.000 · MRR 1.000 · unanswerable flagged 1 of 1"]
    assert list(_tab(at, "Evaluation").dataframe[0].value["questions file"]) == ["mine.jsonl", "q.jsonl"]
    assert [r.questions_file for r in list_evals(kb, actor=LOCAL_OPERATOR, collection="evals")] == [
        "mine.jsonl",
        "q.jsonl",
    ]

    # A file that is not a question set: one line naming the line, nothing stored.
    at.file_uploader(key="knowledge_questions").clear().upload("bad.jsonl", b'{"question": 3}\n', "text/plain")
    at.run()
    button(at, "Evaluate").click()
    at.run()
    assert [_shown_as(e.value) for e in at.error] == ["bad.jsonl line 1: The question is empty"]
    assert len(list_evals(kb, actor=LOCAL_OPERATOR, collection="evals")) == 2


# -- what uploaders wrote is shown as text -------------------------------------------------------------------


def test_markup_in_file_names_and_passages_is_shown_literally(kb: KnowledgeBase) -> None:
    _ingest(kb, "markup", {MARKUP_NAME: MARKUP_TEXT})
    at = _knowledge(collection="markup")
    assert _documents(at) == [MARKUP_NAME]  # a table cell is data, never markup
    assert at.multiselect(key="knowledge_doomed").options == [MARKUP_NAME]

    _search(at, "opening hours ward")
    hit = _hits(at)[0]
    assert hit.startswith("**1.** "), hit  # the page's own bold rank; the rest is the uploader's
    assert _shown_as(hit.removeprefix("**1.** ")).startswith(f"{MARKUP_NAME} · similarity "), hit
    assert MARKUP_TEXT in [t.value for t in _tab(at, "Search").text]  # st.text: shown as typed, never parsed

    # The lines an upload leaves: a good file's and a refused one's, both named by the uploader.
    at.file_uploader[0].upload(MARKUP_NAME.replace(".txt", ".md"), MARKUP_TEXT.encode(), "text/markdown")
    at.file_uploader[0].upload(MARKUP_NAME.replace(".txt", ".pdf"), JPEG_AS_PDF, "application/pdf")
    at.run()
    button(at, "Ingest").click()
    at.run()
    assert not at.exception, at.exception
    [success] = [s.value for s in at.success]
    assert _shown_as(success) == f"ingested: {MARKUP_NAME.replace('.txt', '.md')} (1 passages)"
    [error] = [e.value for e in at.error]
    assert _shown_as(error).startswith(f"{MARKUP_NAME.replace('.txt', '.pdf')}: "), error

    # A question file's name, in the line saying what is wrong with it.
    questions = MARKUP_NAME.replace(".txt", ".jsonl")
    at.file_uploader(key="knowledge_questions").upload(questions, b"not json\n", "text/plain")
    at.run()
    button(at, "Evaluate").click()
    at.run()
    [error] = [e.value for e in at.error]
    assert _shown_as(error).startswith(f"{questions} line 1: not JSON"), error
    at.file_uploader(key="knowledge_questions").clear().upload(questions, b"\xff\xfe\x00bad", "text/plain")
    at.run()
    button(at, "Evaluate").click()
    at.run()
    assert [_shown_as(e.value) for e in at.error] == [f"{questions}: not UTF-8 text"]


# -- citations in Chat ---------------------------------------------------------------------------------------


def _bubbles(at: AppTest):  # type: ignore[no-untyped-def]
    return [m for m in at.chat_message if m.name == "assistant"]


def test_chat_shows_numbered_citations_and_the_low_relevance_badge(kb: KnowledgeBase, kb_store: Store) -> None:
    _ingest(kb, "clinic", CLINIC_TEXTS)
    save_version(kb_store, "receptionist", {"knowledge_collection": "clinic"}, actor=LOCAL_OPERATOR)
    at = sign_in("rita", PW)
    persona = at.selectbox(key="chat_persona")
    persona.select_index(next(i for i, o in enumerate(persona.options) if "(receptionist)" in o))
    at.selectbox(key="chat_backend").select("ollama")
    at.run()
    button(at, "New conversation").click()
    at.run()
    at.chat_input(key="chat_input").set_value("Is parking free in the courtyard?").run()
    assert not at.exception, at.exception

    reply = _bubbles(at)[-1]
    assert reply.markdown[0].value == "Our hours are 8 to 6."
    lines = [c.value for c in reply.caption if c.value.startswith("[1] ")]
    assert lines, [c.value for c in reply.caption]
    cited = lines[0].split("  \n")
    assert re.fullmatch(rf"\[1\] {re.escape(plain_markdown('parking.txt'))} · similarity 0\.\d\d", cited[0]), cited
    assert [c[: c.index(" ")] for c in cited] == [f"[{n}]" for n in range(1, len(cited) + 1)]
    assert "retrieval" in cited[-1] and " ms" in cited[-1]
    assert not any("low relevance" in c.value for c in reply.caption)
    passages = next(e for e in reply.expander if e.label == "Passages")
    assert CLINIC_TEXTS["parking.txt"] in [t.value for t in passages.text]

    at.chat_input(key="chat_input").set_value(UNRELATED).run()
    assert not at.exception, at.exception
    reply = _bubbles(at)[-1]
    assert any(c.value.startswith(":orange-badge[low relevance]") for c in reply.caption), [
        c.value for c in reply.caption
    ]
    assert any(c.value.startswith("[1] ") for c in reply.caption)  # the passages it was given, all the same
    first = _bubbles(at)[-2]  # the earlier reply keeps its own, relevant, citations
    assert not any("low relevance" in c.value for c in first.caption)


def test_conversations_are_searched_by_meaning(kb: KnowledgeBase) -> None:
    from tests.knowledge.test_semantic import _conversation

    wanted = _conversation(kb, "I have to cancel my dentist appointment tomorrow", "It is cancelled.")
    _conversation(kb, "Do you sell garden furniture?", "No, we are a clinic.")
    at = sign_in("rita", PW)
    at.switch_page(view("conversations")).run()
    at.toggle(key="conv_semantic").set_value(True).run()
    at.text_input(key="conv_search").input("cancel appointment").run()
    assert not at.exception, at.exception
    lines = [md.value for md in at.markdown if md.value.startswith("**#")]
    assert lines and lines[0].startswith(f"**#{wanted}** · user · similarity ")
    assert any("closest in meaning" in c.value for c in at.caption)


def test_the_persona_form_names_a_collection(kb: KnowledgeBase, kb_store: Store) -> None:
    from callbot_core.personas.versions import get_version

    _ingest(kb, "persona-kb", {"fees.txt": CLINIC_TEXTS["fees.txt"]})
    at = sign_in("rita", PW)
    at.switch_page(view("personas")).run()
    assert not at.exception, at.exception
    collection = next(s for s in at.selectbox if s.label == "Knowledge collection")
    assert "persona-kb" in collection.options
    collection.select("persona-kb")
    next(n for n in at.number_input if n.label == "Passages (k)").set_value(3)
    next(b for b in at.get("form_submit_button") if b.label == "Save as a new version").click()
    at.run()
    assert not at.exception, at.exception
    version = get_version(kb_store, "receptionist")
    assert (version.knowledge_collection, version.knowledge_k, version.knowledge_threshold) == ("persona-kb", 3, None)
    save_version(kb_store, "receptionist", {"knowledge_collection": None}, actor=LOCAL_OPERATOR)
