"""Scenario suite files: parsing and validation that name the line and the field of every mistake.

A suite is YAML:

    name: receptionist-basics
    description: Hours and appointments
    persona: receptionist@1        # optional default when the command names none
    turns:
      - say: What are your opening hours?
        expect:
          - contains: monday
          - max_words: 60
          - similar_to: We are open Monday to Friday from 8am to 6pm.
            threshold: 0.5

Each assertion is a mapping with exactly one kind key (its main value) and that kind's options.
The file is composed into YAML nodes rather than loaded as plain data so that every error can point
at the line it comes from: suite files are written by hand and a bare "invalid suite" helps nobody.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from callbot_core.errors import InvalidInput

# kind -> (name of its main value as stored in the spec, {option: default}); None means required.
KINDS: dict[str, tuple[str, dict[str, Any]]] = {
    "contains": ("value", {"case_insensitive": True}),
    "not_contains": ("value", {"case_insensitive": True}),
    "regex": ("value", {"case_insensitive": False}),
    "max_words": ("n", {}),
    "max_ttft_ms": ("ms", {}),
    "max_total_ms": ("ms", {}),
    "similar_to": ("reference", {"threshold": 0.6}),
    "judge": ("rubric", {"min_score": 3, "backend": None, "model": None}),
    # Retrieval (personas with a knowledge collection): a file among the turn's passages / cited by the reply.
    "retrieved": ("source", {}),
    "cites": ("source", {}),
}
_TOP_LEVEL = ("name", "description", "persona", "turns", "simulate", "expect_each")
_SIMULATE_FIELDS = ("goal", "personality", "turns", "opening")
_TURN_FIELDS = ("say", "expect")


class SuiteError(InvalidInput):
    """A suite file that cannot be used; the message starts with `file line N:`."""


@dataclass(frozen=True, slots=True)
class Assertion:
    kind: str
    spec: dict[str, Any]  # the main value under its own name plus every option, defaults filled in
    line: int

    def describe(self) -> str:
        main = self.spec[KINDS[self.kind][0]]
        text = str(main).replace("\n", " ")
        return f"{self.kind} {text[:40] + '…' if len(text) > 40 else text}"


@dataclass(frozen=True, slots=True)
class Turn:
    say: str
    expect: tuple[Assertion, ...]
    line: int


@dataclass(frozen=True, slots=True)
class Simulate:
    """A simulated caller drives the conversation instead of scripted turns (see callbot_core.experiments.simulated)."""

    goal: str
    personality: str = "polite"
    turns: int = 3
    opening: str | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    turns: tuple[Turn, ...]
    description: str = ""
    persona: str | None = None
    source: str = field(default="<suite>", compare=False)
    simulate: Simulate | None = None
    expect_each: tuple[Assertion, ...] = ()

    @property
    def assertion_count(self) -> int:
        if self.simulate is not None:
            return self.simulate.turns * len(self.expect_each)
        return sum(len(t.expect) for t in self.turns)


# The suites that ship with the workbench (package data, so an installed wheel has them too).
SHIPPED_SUITES_DIR = Path(str(resources.files("callbot_core.experiments.evals").joinpath("suites")))


def suite_files(suites_dir: Path | None = None) -> dict[str, Path]:
    """Suites by file name: those in `suites_dir` (CALLBOT_SUITES_DIR) when one is set, else the shipped ones."""
    folder = suites_dir or SHIPPED_SUITES_DIR
    return {p.name: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def resolve_suite(ref: str | Path, suites_dir: Path | None = None) -> Path:
    """A suite file: `ref` itself when it exists, else a suite of that name (with or without `.yaml`) in
    `suites_dir`, else a shipped one."""
    path = Path(ref)
    if path.exists():
        return path
    name = path.name if path.suffix else f"{path.name}.yaml"
    for folder in (suites_dir, SHIPPED_SUITES_DIR):
        if folder is not None and (folder / name).is_file():
            return folder / name
    return path


def load_suite(path: str | Path) -> Suite:
    """Parse a suite file; a bare name such as `receptionist` finds the shipped suite of that name."""
    p = resolve_suite(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(n.removesuffix(".yaml") for n in suite_files())
        raise SuiteError(f"Suite file {p} does not exist (shipped suites, by name: {known})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"Suite file {p} cannot be read: {exc}") from None
    return parse_suite(text, source=p.name, default_name=p.stem)


def parse_suite(text: str | bytes, *, source: str = "<suite>", default_name: str | None = None) -> Suite:
    """A suite from YAML text, or from the bytes of an uploaded file (which must be UTF-8)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SuiteError(
                f"{source}: not UTF-8 text (byte {exc.start} is 0x{text[exc.start]:02x}); save it as UTF-8"
            ) from None
    return _Parser(source).suite(text, default_name)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        # A loader only for its constructor: turns scalar nodes into Python values with YAML's own typing.
        self._loader = yaml.SafeLoader("")

    # -- helpers -----------------------------------------------------------------------------------

    def fail(self, node: yaml.Node | None, where: str, problem: str) -> SuiteError:
        line = f" line {node.start_mark.line + 1}" if node is not None else ""
        prefix = f"{where}: " if where else ""
        return SuiteError(f"{self.source}{line}: {prefix}{problem}")

    def mapping(self, node: yaml.Node, where: str, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, where, f"{what} must be a mapping (key: value), not {_kind_of(node)}")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self._loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise self.fail(key_node, where, f"field names must be text, not {key!r}")
            if key in out:
                raise self.fail(key_node, where, f"field '{key}' is given twice")
            out[key] = (key_node, value_node)
        return out

    def value(self, node: yaml.Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def text(self, node: yaml.Node, where: str, name: str, *, allow_empty: bool = False) -> str:
        value = self.value(node) if isinstance(node, yaml.ScalarNode) else None
        # Numbers and booleans are accepted as their text: `contains: 8` means the characters "8".
        if isinstance(value, bool | int | float) and not isinstance(node, yaml.MappingNode):
            value = node.value
        if not isinstance(value, str):
            raise self.fail(node, where, f"'{name}' must be text, not {_kind_of(node)}")
        if not allow_empty and not value.strip():
            raise self.fail(node, where, f"'{name}' is empty")
        return value

    def number(self, node: yaml.Node, where: str, name: str, *, integer: bool, low: float, high: float) -> float:
        value = self.value(node) if isinstance(node, yaml.ScalarNode) else None
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            want = "a whole number" if integer else "a number"
            raise self.fail(node, where, f"'{name}' must be {want}, not {_describe(node, value)}")
        if not low <= value <= high:
            bound = f"at least {low:g}" if high == float("inf") else f"between {low:g} and {high:g}"
            raise self.fail(node, where, f"'{name}' must be {bound}, not {value}")
        return value

    def boolean(self, node: yaml.Node, where: str, name: str) -> bool:
        value = self.value(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, bool):
            raise self.fail(node, where, f"'{name}' must be true or false, not {_describe(node, value)}")
        return value

    # -- the document ------------------------------------------------------------------------------

    def suite(self, text: str, default_name: str | None) -> Suite:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise SuiteError(f"{self.source}{line}: not valid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise SuiteError(f"{self.source}: not valid YAML: {exc}") from None
        if root is None:
            raise SuiteError(f"{self.source}: the file is empty; a suite needs at least 'turns'")
        fields = self.mapping(root, "", "a suite")
        for key, (key_node, _) in fields.items():
            if key not in _TOP_LEVEL:
                raise self.fail(key_node, "", f"unknown field '{key}' (known: {', '.join(_TOP_LEVEL)})")
        name = self.text(fields["name"][1], "", "name") if "name" in fields else default_name
        if not name:
            raise self.fail(root, "", "missing field 'name'")
        description = (
            self.text(fields["description"][1], "", "description", allow_empty=True)
            if ("description" in fields)
            else ""
        )
        persona = None
        if "persona" in fields and not _is_null(fields["persona"][1]):
            persona = self.text(fields["persona"][1], "", "persona").strip()
        if "simulate" in fields:
            if "turns" in fields:
                raise self.fail(fields["turns"][0], "", "give either 'turns' or 'simulate', not both")
            simulate = self.simulate(fields["simulate"][1])
            expect_each: list[Assertion] = []
            if "expect_each" in fields and not _is_null(fields["expect_each"][1]):
                each_node = fields["expect_each"][1]
                if not isinstance(each_node, yaml.SequenceNode):
                    raise self.fail(each_node, "", f"'expect_each' must be a list, not {_kind_of(each_node)}")
                for i, a_node in enumerate(each_node.value, start=1):
                    expect_each.append(self.assertion(a_node, f"expect_each, assertion {i}"))
            return Suite(
                name=name.strip(), description=description.strip(), persona=persona, turns=(), source=self.source,
                simulate=simulate, expect_each=tuple(expect_each),
            )  # fmt: skip
        if "expect_each" in fields:
            raise self.fail(
                fields["expect_each"][0], "", "'expect_each' goes with 'simulate'; scripted turns use 'expect'"
            )
        if "turns" not in fields:
            raise self.fail(root, "", "missing field 'turns' (or a 'simulate' block)")
        turns_node = fields["turns"][1]
        if not isinstance(turns_node, yaml.SequenceNode):
            raise self.fail(turns_node, "", f"'turns' must be a list, not {_kind_of(turns_node)}")
        if not turns_node.value:
            raise self.fail(turns_node, "", "'turns' is empty; a suite needs at least one turn")
        turns = tuple(self.turn(node, i) for i, node in enumerate(turns_node.value, start=1))
        return Suite(
            name=name.strip(), description=description.strip(), persona=persona, turns=turns, source=self.source
        )

    def simulate(self, node: yaml.Node) -> Simulate:
        where = "simulate"
        fields = self.mapping(node, where, "'simulate'")
        for key, (key_node, _) in fields.items():
            if key not in _SIMULATE_FIELDS:
                raise self.fail(key_node, where, f"unknown field '{key}' (known: {', '.join(_SIMULATE_FIELDS)})")
        if "goal" not in fields:
            raise self.fail(node, where, "missing field 'goal'")
        goal = self.text(fields["goal"][1], where, "goal").strip()
        personality = (
            self.text(fields["personality"][1], where, "personality").strip() if "personality" in fields else "polite"
        )
        turns = 3
        if "turns" in fields:
            turns = int(self.number(fields["turns"][1], where, "turns", integer=True, low=1, high=20))
        opening = None
        if "opening" in fields and not _is_null(fields["opening"][1]):
            opening = self.text(fields["opening"][1], where, "opening").strip()
        return Simulate(goal=goal, personality=personality, turns=turns, opening=opening, line=node.start_mark.line + 1)

    def turn(self, node: yaml.Node, number: int) -> Turn:
        where = f"turn {number}"
        fields = self.mapping(node, where, "a turn")
        for key, (key_node, _) in fields.items():
            if key not in _TURN_FIELDS:
                raise self.fail(key_node, where, f"unknown field '{key}' (known: {', '.join(_TURN_FIELDS)})")
        if "say" not in fields:
            raise self.fail(node, where, "missing field 'say'")
        say = self.text(fields["say"][1], where, "say").strip()
        assertions: list[Assertion] = []
        if "expect" in fields and not _is_null(fields["expect"][1]):
            expect_node = fields["expect"][1]
            if not isinstance(expect_node, yaml.SequenceNode):
                raise self.fail(expect_node, where, f"'expect' must be a list, not {_kind_of(expect_node)}")
            for i, a_node in enumerate(expect_node.value, start=1):
                assertions.append(self.assertion(a_node, f"{where}, assertion {i}"))
        return Turn(say=say, expect=tuple(assertions), line=node.start_mark.line + 1)

    def assertion(self, node: yaml.Node, where: str) -> Assertion:
        fields = self.mapping(node, where, "an assertion")
        kinds = [k for k in fields if k in KINDS]
        all_options = {opt for _, options in KINDS.values() for opt in options}
        if not kinds:
            unknown = next((k for k in fields if k not in all_options), None)
            known = ", ".join(KINDS)
            if unknown is not None:
                raise self.fail(fields[unknown][0], where, f"unknown kind '{unknown}' (known: {known})")
            raise self.fail(node, where, f"no assertion kind given (known: {known})")
        if len(kinds) > 1:
            raise self.fail(fields[kinds[1]][0], where, f"one kind per assertion, found {' and '.join(kinds)}")
        kind = kinds[0]
        main_name, options = KINDS[kind]
        for key, (key_node, _) in fields.items():
            if key != kind and key not in options:
                allowed = ", ".join(options) or "none"
                raise self.fail(key_node, where, f"unknown option '{key}' for {kind} (options: {allowed})")
        main_node = fields[kind][1]
        spec: dict[str, Any] = {main_name: self.main_value(kind, main_node, where)}
        for option, default in options.items():
            spec[option] = self.option(kind, option, fields[option][1], where) if option in fields else default
        if kind == "regex":
            flags = re.IGNORECASE if spec["case_insensitive"] else 0
            try:
                re.compile(spec["value"], flags)
            except re.error as exc:
                raise self.fail(main_node, where, f"bad regex {spec['value']!r}: {exc}") from None
        return Assertion(kind=kind, spec=spec, line=node.start_mark.line + 1)

    def main_value(self, kind: str, node: yaml.Node, where: str) -> Any:
        if kind == "max_words":
            return int(self.number(node, where, kind, integer=True, low=1, high=float("inf")))
        if kind in ("max_ttft_ms", "max_total_ms"):
            return float(self.number(node, where, kind, integer=False, low=1, high=float("inf")))
        # contains, not_contains, regex, similar_to, judge, retrieved, cites: text; spaces matter for contains.
        return self.text(node, where, kind)

    def option(self, kind: str, option: str, node: yaml.Node, where: str) -> Any:
        if option == "case_insensitive":
            return self.boolean(node, where, option)
        if option == "threshold":
            return float(self.number(node, where, option, integer=False, low=-1, high=1))
        if option == "min_score":
            return int(self.number(node, where, option, integer=True, low=1, high=5))
        # judge backend / model: names.
        return self.text(node, where, option).strip()


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _kind_of(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if _is_null(node):
        return "nothing"
    return f"{node.value!r}"


def _describe(node: yaml.Node, value: Any) -> str:
    return _kind_of(node) if not isinstance(node, yaml.ScalarNode) or value is None else repr(value)
