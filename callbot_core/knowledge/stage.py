"""Retrieval as a stage of a turn, and the observer that stores which passages each turn used.

The stage runs between validate and prompt for personas whose version names a collection (others skip it: no row,
no time). It searches with the caller's message, keeps the best passages that fit half of the context the prompt
has left (the other half stays for the conversation so far), and hands them to the prompt as numbered context the
model is asked to cite as [1], [2]. Its time is the `retrieve` row in `turn_stages`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import insert

from callbot_core.conversations.observers import TurnObserver
from callbot_core.conversations.prompt import PER_MESSAGE_OVERHEAD
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.retrieval import Hit, Retrieval, search
from callbot_core.store.models import TurnRetrieval

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from callbot_core.conversations.turn import TurnContext

RETRIEVAL_NOTE = "retrieval"  # turn.notes key: the Retrieval the stage made
USED_NOTE = "retrieval_used"  # turn.notes key: the hits that went into the prompt (numbered from 1)

INSTRUCTION = (
    "Answer from these passages of your documents when they help, and cite the passage you used by its number,"
    " like [1]. If they do not contain the answer, say you do not know."
)
LOW_RELEVANCE = "None of these passages matched the question well: if the answer is not in them, say you do not know."


def citation_label(hit: Hit) -> str:
    """How a passage is named to the model and to the reader: "fees.pdf, page 3"."""
    return hit.source if hit.page is None else f"{hit.source}, page {hit.page}"


def context_block(hits: list[Hit], low_relevance: bool) -> str:
    lines = [INSTRUCTION]
    if low_relevance:
        lines.append(LOW_RELEVANCE)
    for number, hit in enumerate(hits, start=1):
        lines.append(f"[{number}] ({citation_label(hit)}) {hit.text}")
    return "\n".join(lines)


class Retrieve:
    """Find the passages of the persona version's collection that answer the caller's message."""

    name: ClassVar[str] = "retrieve"
    streams: ClassVar[bool] = False
    after_failure: ClassVar[bool] = False

    def applies(self, turn: TurnContext) -> bool:
        version = turn.persona_version
        return version is not None and bool(version.knowledge_collection)

    def run(self, turn: TurnContext) -> None:
        version, llm = turn.persona_version, turn.backend
        assert version is not None and llm is not None and turn.params is not None
        kb = KnowledgeBase(turn.store, turn.settings)
        retrieval = search(
            kb,
            version.knowledge_collection or "",
            turn.user_text,
            k=version.knowledge_k,
            threshold=version.knowledge_threshold,
        )
        turn.notes[RETRIEVAL_NOTE] = retrieval
        model = turn.model
        left = (
            llm.context_window(model)
            - turn.params.max_tokens
            - llm.count_tokens(version.system_prompt, model)
            - llm.count_tokens(turn.user_text, model)
            - 2 * PER_MESSAGE_OVERHEAD
        )
        budget = left // 2 - llm.count_tokens(context_block([], retrieval.low_relevance), model)
        used: list[Hit] = []
        for hit in retrieval.hits:
            cost = llm.count_tokens(f"[{len(used) + 1}] ({citation_label(hit)}) {hit.text}\n", model)
            if cost > budget:
                break  # in rank order: a lower-ranked passage never displaces a better one
            used.append(hit)
            budget -= cost
        turn.notes[USED_NOTE] = used
        if used or retrieval.low_relevance:
            turn.context.append(context_block(used, retrieval.low_relevance))


class RetrievalObserver(TurnObserver):
    """Stores the passages a turn's prompt used (`turn_retrievals`), with the turn's metrics row."""

    def persist(self, turn: TurnContext, session: Session) -> None:
        retrieval: Retrieval | None = turn.notes.get(RETRIEVAL_NOTE)
        metrics_id = turn.notes.get("turn_metrics_id")
        used: list[Hit] = turn.notes.get(USED_NOTE) or []
        if retrieval is None or metrics_id is None or not used:
            return
        session.execute(
            insert(TurnRetrieval),
            [
                dict(
                    turn_metrics_id=metrics_id,
                    chunk_id=hit.chunk_id,
                    collection=retrieval.collection,
                    source=hit.source,
                    page=hit.page,
                    heading=hit.heading,
                    rank=number,
                    similarity=hit.similarity,
                    low_relevance=retrieval.low_relevance,
                )
                for number, hit in enumerate(used, start=1)
            ],
        )
