"""Knowledge: collections of documents the personas answer from. Upload files (with a progress bar), see and delete
documents, try a question against a collection, and run and read retrieval evaluations.

Everything goes through callbot_core.knowledge; file names and passages are the uploader's text and are shown
literally (tables, st.text, escaped Markdown), never as live Markdown or HTML.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.common import FAILED, allowed, current_user, run_action, settings, store
from app.rendering import plain_markdown
from callbot_core.knowledge.evaluation import list_evals, parse_questions
from callbot_core.knowledge.index import KnowledgeBase, SourceFile

COLLECTION = "knowledge_collection"
RESULTS = "knowledge_results"  # the last upload's outcomes, shown after the rerun that clears the uploader
UPLOADS = "knowledge_uploads"  # a counter in the uploader's key: a new key empties it after an upload
INGESTED = "knowledge_ingested"  # the collection the last upload went into: the picker shows it after the rerun
PICK = "knowledge_pick"
NEW = "knowledge_new"
MISSING = "–"  # what an empty cell shows: "None" reads as if something were called None


def _cell(value: object, fmt: str = "{}") -> str:
    return MISSING if value is None else fmt.format(value)


user = current_user()
kb = KnowledgeBase(store(), settings())
st.title("Knowledge")
st.caption(
    "Documents the personas answer from. A persona version names a collection (Personas page); each turn then "
    "retrieves the best passages and the reply cites them."
)

collections = run_action(kb.collections, actor=user)
if collections is FAILED:
    st.stop()
names = [c.name for c in collections]
may_edit = allowed("knowledge.edit")

# A keyed picker keeps its value from run to run and ignores a default once drawn: it is set here, before it is
# drawn, so it shows the collection an upload just made (the name box emptied) and never shows "No collections yet"
# beside listed ones; on a new visit it shows the collection of the last one.
if (made := st.session_state.pop(INGESTED, None)) in names:
    st.session_state[PICK], st.session_state[NEW] = made, ""
elif names and st.session_state.get(PICK) not in names:
    st.session_state[PICK] = st.session_state[COLLECTION] if st.session_state.get(COLLECTION) in names else names[0]
left, right = st.columns([2, 1], vertical_alignment="bottom")
choice = left.selectbox("Collection", names, placeholder="No collections yet", key=PICK)
new_name = right.text_input("or a new one", key=NEW, placeholder="e.g. clinic") if may_edit else ""
collection = (new_name or "").strip() or choice
if collection:
    st.session_state[COLLECTION] = collection

if collections:
    st.dataframe(
        pd.DataFrame(
            [
                {"collection": c.name, "documents": c.documents, "passages": c.chunks,
                 "embedder": f"{c.embedder} ({c.dimensions})", "created": c.created_at, "by": c.created_by or MISSING}
                for c in collections
            ]
        ),
        hide_index=True,
        width="stretch",
    )  # fmt: skip
else:
    st.info("No collections yet." + (" Name one above and upload documents into it." if may_edit else ""))

if not collection:
    st.stop()

tab_docs, tab_search, tab_eval = st.tabs(["Documents", "Search", "Evaluation"])

with tab_docs:
    if may_edit:
        count = st.session_state.setdefault(UPLOADS, 0)
        files = st.file_uploader(
            "Add documents (txt, md, html, pdf, docx, csv)",
            type=["txt", "md", "html", "htm", "pdf", "docx", "csv"],
            accept_multiple_files=True,
            key=f"knowledge_files_{count}",
        )
        c1, c2, c3 = st.columns(3)
        size = c1.number_input("Chunk size (characters)", 100, 20_000, settings().knowledge_chunk_size, step=100)
        overlap = c2.number_input("Overlap (characters)", 0, 5_000, settings().knowledge_chunk_overlap, step=50)
        if c3.button("Ingest", type="primary", disabled=not files, key="knowledge_ingest"):
            bar = st.progress(0.0, text="Reading…")

            def progress(done: int, total: int, current: str) -> None:
                label = f"{done} of {total} · {current}" if current else f"{total} of {total}"
                bar.progress(done / total if total else 1.0, text=label)

            sources = [SourceFile(f.name, data=f.getvalue()) for f in files or []]
            outcomes = run_action(
                kb.ingest, collection, sources, actor=user, chunk_size=int(size), overlap=int(overlap),
                progress=progress,
            )  # fmt: skip
            if outcomes is not FAILED:
                st.session_state[RESULTS] = [(o.status, o.source, o.chunks, o.error) for o in outcomes]
                st.session_state[INGESTED] = collection
                st.session_state[UPLOADS] = count + 1
                st.rerun()
        for status, source, chunks, error in st.session_state.pop(RESULTS, []):
            if status == "refused":
                st.error(plain_markdown(error or source))
            else:
                st.success(f"{status}: {plain_markdown(source)} ({chunks} passages)")

    documents = run_action(kb.documents, collection, actor=user) if collection in names else []
    if documents is FAILED:
        documents = []
    if documents:
        st.dataframe(
            pd.DataFrame(
                [
                    {"source": d.source, "format": d.format, "size (bytes)": d.size_bytes, "pages": _cell(d.pages),
                     "passages": d.chunks, "chunk size": d.chunk_size, "overlap": d.chunk_overlap,
                     "ingested": d.ingested_at, "by": d.ingested_by or MISSING}
                    for d in documents
                ]
            ),
            hide_index=True,
            width="stretch",
        )  # fmt: skip
        if may_edit:
            d1, d2 = st.columns([3, 1], vertical_alignment="bottom")
            doomed = d1.multiselect("Delete documents", [d.source for d in documents], key="knowledge_doomed")
            if d2.button("Delete", disabled=not doomed, key="knowledge_delete"):
                for source in doomed:
                    run_action(kb.delete_document, collection, source, actor=user)
                st.rerun()
    elif collection in names:
        st.caption("This collection has no documents.")

with tab_search:
    if collection not in names:
        st.caption("Upload documents into this collection first.")
    else:
        with st.form("knowledge_search"):
            question = st.text_input("Question", placeholder="Are you open on Saturday?")
            s1, s2 = st.columns(2)
            k = s1.number_input("Passages (k)", 1, 50, 5)
            threshold = s2.number_input(
                "Low-relevance threshold", 0.0, 1.0, settings().knowledge_low_relevance, step=0.05,
                help="A best similarity under this flags the question as probably not answered by the documents",
            )  # fmt: skip
            asked = st.form_submit_button("Search")
        if asked:
            from callbot_core.knowledge.retrieval import search

            result = run_action(search, kb, collection, question, k=int(k), threshold=float(threshold), actor=user)
            if result is not FAILED:
                if result.low_relevance:
                    st.warning(
                        f"Low relevance: the best similarity is {result.best_similarity or 0:.2f}, under"
                        f" {result.threshold:.2f}. The documents probably do not answer this."
                    )
                st.caption("Similarity: cosine similarity of passage and question, 0-1, higher is better.")
                for hit in result.hits:
                    where = hit.source if hit.page is None else f"{hit.source}, page {hit.page}"
                    similarity = "-" if hit.similarity is None else f"{hit.similarity:.2f}"
                    st.markdown(
                        f"**{hit.rank}.** {plain_markdown(where)} · similarity {similarity}"
                        + (f" · {plain_markdown(hit.heading)}" if hit.heading else "")
                    )
                    st.text(hit.text)

with tab_eval:
    if collection in names and allowed("knowledge.eval"):
        questions_file = st.file_uploader(
            "Question set (JSON Lines: question, expected_sources)", type=["jsonl", "json", "txt"],
            key="knowledge_questions",
        )  # fmt: skip
        e1, e2, e3 = st.columns(3, vertical_alignment="bottom")
        eval_k = e1.number_input("k", 1, 50, 5, key="knowledge_eval_k")
        eval_threshold = e2.number_input(
            "Threshold", 0.0, 1.0, settings().knowledge_low_relevance, step=0.05, key="knowledge_eval_threshold"
        )
        if e3.button("Evaluate", disabled=questions_file is None, key="knowledge_eval_run"):
            from callbot_core.knowledge.evaluation import evaluate

            try:
                text = questions_file.getvalue().decode("utf-8-sig") if questions_file else ""
            except UnicodeDecodeError:
                st.error(f"{plain_markdown(questions_file.name)}: not UTF-8 text")
                text = None
            # Its errors name the file and run_action shows them as Markdown: the uploader's name goes in escaped.
            name = plain_markdown(questions_file.name) if questions_file else ""
            questions = run_action(parse_questions, text, name=name) if text is not None else FAILED
            if questions is not FAILED and questions_file is not None:
                bar = st.progress(0.0, text="Asking…")
                run = run_action(
                    evaluate, kb, collection, questions, actor=user, k=int(eval_k), threshold=float(eval_threshold),
                    questions_file=questions_file.name,
                    progress=lambda done, total: bar.progress(done / total, text=f"{done} of {total}"),
                )  # fmt: skip
                if run is not FAILED:
                    st.success(
                        f"recall@{run.k} {run.recall_at_k or 0:.3f} · MRR {run.mrr or 0:.3f} · unanswerable flagged"
                        f" {run.unanswerable_flagged} of {run.unanswerable}"
                    )
    runs = run_action(list_evals, kb, actor=user, collection=collection)
    if runs is not FAILED and runs:
        st.dataframe(
            pd.DataFrame(
                [
                    {"when": r.created_at, "questions file": r.questions_file, "k": r.k, "threshold": r.threshold,
                     "chunk size": _cell(r.chunk_size), "overlap": _cell(r.chunk_overlap),
                     "recall@k": _cell(r.recall_at_k, "{:.3f}"), "MRR": _cell(r.mrr, "{:.3f}"),
                     "unanswerable flagged": f"{r.unanswerable_flagged}/{r.unanswerable}",
                     "by": r.created_by or MISSING}
                    for r in runs
                ]
            ),
            hide_index=True,
            width="stretch",
        )  # fmt: skip
    elif runs is not FAILED:
        st.caption("No retrieval evaluations of this collection yet.")
