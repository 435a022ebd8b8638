"""The layout's properties: no import cycle in the engine, front-end libraries only in their front ends.

Imports are read with `ast`, not by importing, so the test sees lazy imports inside functions too: a cycle hidden
in a function is still a cycle in the design. Imports under `if TYPE_CHECKING:` are left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "callbot_core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The engine modules `path` imports (a name imported from a package counts as its submodule when it is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known and m != me}


def engine_graph() -> dict[str, set[str]]:
    files = sorted(CORE.rglob("*.py"))
    known = {module_name(p) for p in files}
    graph = {module_name(p): imported_modules(p, known) for p in files}
    # Importing a submodule runs its package's __init__ first, so a module depends on its parents too.
    for me, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in known)
        deps.discard(me)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # A package's own __init__ importing its submodules is how packages re-export: not a cycle by itself.
            if node.startswith(dep + "."):
                continue
            if colour.get(dep) == GREY:
                return stack[stack.index(dep) :] + [dep]
            if colour.get(dep) == WHITE and (found := dfs(dep)):
                return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (found := dfs(node)):
            return found
    return None


def test_the_detector_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_has_no_import_cycle() -> None:
    cycle = find_cycle(engine_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_engine_is_found_by_concept_with_few_modules_at_the_top() -> None:
    top = sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 4, top


def _imports_of(folder: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_front_end_libraries_stay_in_their_front_ends() -> None:
    for path, names in _imports_of(CORE).items():
        assert "streamlit" not in names, f"{path} imports streamlit: only app/ may"
        if not path.startswith("callbot_core/api/"):
            assert "fastapi" not in names, f"{path} imports fastapi: only callbot_core/api/ may"


def test_the_app_holds_no_sql() -> None:
    for path, names in _imports_of(ROOT / "app").items():
        assert not names & {"sqlalchemy", "duckdb", "sqlite3", "psycopg"}, f"{path} talks to a database directly"
