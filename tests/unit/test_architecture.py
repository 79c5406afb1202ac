"""The package's dependencies point one way (docs/explanation/architecture.md).

Read from the source with ``ast``: an import hidden under ``TYPE_CHECKING`` or inside a function
still counts, so a cycle cannot be hidden from these tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "processgpt_sync"

# Lower layers never import higher ones. Within a layer, imports must not form a cycle.
LAYERS: list[set[str]] = [
    {"errors", "version", "queries", "models", "payload", "deep_json", "retrying", "infra",
     "blocking", "stats", "settings", "pool", "hooks", "exit_stop"},
    {"storage", "storage.base", "storage.deadline", "storage.postgres", "storage.install",
     "storage.supabase", "embedded"},
    {"events", "todo", "feedback", "loops", "budget", "gc_tuning", "executor", "a2a"},
    {"event_writer", "runs", "outcomes"},
    {"human", "recorder"},
    {"inflight", "worker", "shutdown"},
    {"watch", "claimer", "signals"},
    {"server"},
]
# Imports inside functions, each for an optional or heavy dependency loaded on first use.
LAZY_ALLOWED = {
    ("storage", "storage.supabase"),  # only when Supabase is configured
    ("storage", "storage.postgres"),
    ("storage", "embedded"),  # only when no database is configured
    ("executor", "a2a"),  # needs a2a-sdk, an optional extra
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported at module level, modules imported inside functions) of the package."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level:
                base = package[: len(package) - child.level + 1]
                target = ".".join([*base, *(child.module or "").split(".")]).strip(".")
                names = [target] if child.module else []
                names += [f"{target}.{a.name}".strip(".") for a in child.names]
                found = {n for n in names if resolves(n)}
                (lazy if inner else top).update(found)
            elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith(
                    "processgpt_sync"):
                target = child.module.removeprefix("processgpt_sync").strip(".")  # type: ignore
                (lazy if inner else top).add(target)
            visit(child, inner)

    visit(tree, False)
    return top - {name}, lazy - {name}


def resolves(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")) if name else PACKAGE
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer_of(name: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    return None


def test_every_layered_module_exists() -> None:
    missing = {name for layer in LAYERS for name in layer} - set(MODULES)
    assert not missing


def test_plain_data_imports_nothing_of_the_package() -> None:
    top, lazy = GRAPH["models"]
    assert not top and not lazy


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) is not None))
def test_a_module_imports_nothing_above_its_layer(name: str) -> None:
    top, lazy = GRAPH[name]
    above = {dep for dep in top | lazy if (layer_of(dep) or 0) > (layer_of(name) or 0)
             and (name, dep) not in LAZY_ALLOWED}
    unlayered = {dep for dep in top | lazy if dep and layer_of(dep) is None}
    assert not above, f"{name} imports higher layers: {above}"
    assert not unlayered, f"{name} imports modules above the core: {unlayered}"


def test_the_storage_layer_knows_only_plain_data_and_the_sql() -> None:
    for name in LAYERS[1] - {"embedded"}:
        top, lazy = GRAPH[name]
        assert all(layer_of(dep) in (0, 1) for dep in top | lazy if dep), name


def test_the_event_sink_and_the_todo_view_never_reach_the_database() -> None:
    for name in ("events", "todo"):
        top, lazy = GRAPH[name]
        assert not {d for d in top | lazy if d.startswith("storage")}, name


def test_no_import_cycle_in_the_package() -> None:
    edges = {name: {d for d in top | lazy if d in MODULES and d}
             for name, (top, lazy) in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycle: list[str] = []

    def walk(node: str, path: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycle.extend([*path[path.index(dep):], dep] if dep in path else [node, dep])
                return True
            if dep not in state and walk(dep, [*path, dep]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if start not in state and start and walk(start, [start]):
            break
    assert not cycle, " -> ".join(cycle)


def test_imports_inside_functions_are_only_optional_dependencies() -> None:
    core = {name for layer in LAYERS for name in layer}
    hidden = {(name, dep) for name in core for dep in GRAPH[name][1] if dep}
    assert hidden <= LAZY_ALLOWED, hidden - LAZY_ALLOWED
