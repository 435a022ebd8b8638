"""Evaluating one assertion on one bot reply: (passed, score, detail).

`score` is the measured quantity where there is one (word count, milliseconds, similarity, judge
score), so the leaderboard can average it and not only count passes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from callbot_core.backends.embeddings import Embedder, default_embedder, similarity
from callbot_core.backends.llm import ChatMessage, GenerationParams, LLMBackend
from callbot_core.conversations.service import TurnResult
from callbot_core.errors import CallbotError
from callbot_core.experiments.evals.suite import Assertion

JUDGE_SYSTEM = (
    "You are a neutral evaluator of a phone assistant's reply. Read the rubric, the caller's words and the "
    "reply, then rate how well the reply meets the rubric on a scale from 1 (not at all) to 5 (fully). "
    "Answer with the single digit only."
)
# Deterministic and short: the judge only has to produce one digit.
JUDGE_PARAMS = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=8, seed=0)


@dataclass(frozen=True, slots=True)
class Outcome:
    passed: bool
    score: float | None
    detail: str


@dataclass(slots=True)
class AssertionContext:
    """What the expensive kinds need, resolved lazily so a suite without them never loads a model."""

    embedder: Callable[[], Embedder] = default_embedder
    # name (None: the configured backend) -> backend. The runner passes the conversation service's resolver.
    judge_backends: Callable[[str | None], LLMBackend] | None = None
    # Overrides the judge of every judge assertion (tests, or `--judge-backend` style options).
    judge: LLMBackend | None = None
    judge_model: str | None = None
    _embedder: Embedder | None = field(default=None, init=False)

    def get_embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self.embedder()
        return self._embedder

    def get_judge(self, name: str | None) -> LLMBackend:
        if self.judge is not None and name is None:
            return self.judge
        if self.judge_backends is not None:
            return self.judge_backends(name)
        from callbot_core.backends.llm import get_backend

        return get_backend(name)


def evaluate(assertion: Assertion, said: str, result: TurnResult, context: AssertionContext | None = None) -> Outcome:
    """Check one assertion against the reply to `said`. A failed turn fails every assertion on it."""
    if result.error is not None:
        # Even not_contains fails: an absent reply is not a good reply.
        return Outcome(False, None, f"the turn failed: {result.error}")
    spec = assertion.spec
    text = result.text
    kind = assertion.kind
    if kind in ("contains", "not_contains"):
        needle, hay = spec["value"], text
        if spec["case_insensitive"]:
            needle, hay = needle.casefold(), hay.casefold()
        found = needle in hay
        if kind == "contains":
            return Outcome(found, None, f"found {spec['value']!r}" if found else f"{spec['value']!r} not in the reply")
        return Outcome(not found, None, f"{spec['value']!r} is in the reply" if found else f"no {spec['value']!r}")
    if kind == "regex":
        match = re.search(spec["value"], text, re.IGNORECASE if spec["case_insensitive"] else 0)
        if match:
            return Outcome(True, None, f"matched {match.group(0)!r}")
        return Outcome(False, None, f"no match for /{spec['value']}/")
    if kind == "max_words":
        words = len(text.split())
        return Outcome(words <= spec["n"], float(words), f"{words} words (max {spec['n']})")
    if kind in ("max_ttft_ms", "max_total_ms"):
        measured = result.ttft_ms if kind == "max_ttft_ms" else result.total_ms
        label = "TTFT" if kind == "max_ttft_ms" else "total"
        if measured is None:
            return Outcome(False, None, f"no {label} time was measured")
        return Outcome(measured <= spec["ms"], measured, f"{label} {measured:,.0f} ms (max {spec['ms']:,.0f} ms)")
    if kind in ("retrieved", "cites"):
        return _retrieval(kind, spec["source"].strip(), result)
    context = context or AssertionContext()
    if kind == "similar_to":
        score = similarity(text, spec["reference"], context.get_embedder())
        ok = score >= spec["threshold"]
        return Outcome(ok, score, f"similarity {score:.2f} ({'≥' if ok else '<'} {spec['threshold']:.2f})")
    if kind == "judge":
        return _judge(spec, said, text, context)
    raise ValueError(f"Unknown assertion kind {kind!r}")  # the parser only lets known kinds through


def _same_file(source: str, wanted: str) -> bool:
    return source == wanted or source.rsplit("/", 1)[-1] == wanted


def _retrieval(kind: str, wanted: str, result: TurnResult) -> Outcome:
    """`retrieved`: the file is among the passages the turn's prompt used. `cites`: the reply cites one of that
    file's passages by its number ([2]) or names the file."""
    if result.low_relevance is None:
        return Outcome(False, None, "the turn retrieved nothing (the persona version names no knowledge collection)")
    numbers = [n for n, hit in enumerate(result.citations, start=1) if _same_file(hit.source, wanted)]
    if kind == "retrieved":
        if numbers:
            return Outcome(True, float(numbers[0]), f"{wanted} is passage [{numbers[0]}]")
        got = ", ".join(dict.fromkeys(h.source for h in result.citations)) or "nothing"
        return Outcome(False, None, f"{wanted} was not retrieved (got {got})")
    cited = [n for n in numbers if f"[{n}]" in result.text]
    if cited:
        return Outcome(True, float(cited[0]), f"the reply cites [{cited[0]}] ({wanted})")
    if wanted.casefold() in result.text.casefold():
        return Outcome(True, None, f"the reply names {wanted}")
    if not numbers:
        return Outcome(False, None, f"{wanted} was not retrieved, so the reply cannot cite it")
    shown = ", ".join(f"[{n}]" for n in numbers)
    return Outcome(False, None, f"the reply does not cite {wanted} ({shown})")


def _judge(spec: dict, said: str, reply: str, context: AssertionContext) -> Outcome:
    try:
        backend = context.get_judge(spec.get("backend"))
        model = spec.get("model") or context.judge_model or backend.default_model
        prompt = f"Rubric: {spec['rubric']}\n\nCaller: {said}\n\nReply: {reply}\n\nScore (1-5):"
        messages = [ChatMessage("system", JUDGE_SYSTEM), ChatMessage("user", prompt)]
        answer = "".join(t.text for t in backend.stream(messages, JUDGE_PARAMS, model=model)).strip()
    except CallbotError as exc:
        # A judge that is down says nothing about the reply: record it as failed with the reason.
        return Outcome(False, None, f"the judge failed: {exc}")
    digit = re.search(r"\d", answer)
    if digit is None or not 1 <= int(digit.group(0)) <= 5:
        return Outcome(False, None, f"the judge gave no score 1-5: {answer[:80]!r}")
    score = int(digit.group(0))
    return Outcome(score >= spec["min_score"], float(score), f"judge score {score} (min {spec['min_score']})")
