"""The house rules, checked from the source: rooms by role, imports only downward, no
circles, modules and functions of a size a reader can hold.

Every `import mfbatch...` / `from mfbatch... import` in the package (at module level or
inside a function) is an arrow from the importing module to the imported one; a room's
floor must be at least the floor of everything it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mfbatch"

# Lowest floor first. A module not named here takes its folder's floor.
FLOORS = {
    "mfbatch.errors": 0,
    "mfbatch.version": 0,
    "mfbatch.cores": 0,
    "mfbatch.config": 1,
    "mfbatch.progress": 1,
    "mfbatch.store": 2,
    "mfbatch.data": 2,
    "mfbatch.training": 3,
    "mfbatch.artifact": 4,
    "mfbatch.serving": 5,
    "mfbatch.stages": 6,
    "mfbatch.cli_render": 7,
    "mfbatch.cli_options": 7,
    "mfbatch.api": 7,
    "mfbatch.model_api": 7,  # the loaded-model object of the Python API
    "mfbatch.cli": 8,
    "mfbatch": 9,  # the package's __init__ (the API's names) and __main__
    "mfbatch.__main__": 9,
}
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _floor(module: str) -> int:
    name = module
    while name not in FLOORS:
        name = name.rpartition(".")[0]
    return FLOORS[name]


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # The longest known module the name refers to (a submodule, or the module
            # a name is taken from).
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("mfbatch"):
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {m: _imports(m, p, known) for m, p in modules.items()}
    # A package's __init__ re-exporting its own modules is the package itself.
    return {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}


def test_imports_run_only_downward() -> None:
    upward = [
        f"{source} (floor {_floor(source)}) imports {target} (floor {_floor(target)})"
        for source, targets in _graph().items()
        for target in targets
        if _floor(target) > _floor(source)
    ]
    assert not upward, upward


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (circle := visit(target)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            pytest.fail(" -> ".join(circle))


def test_modules_and_functions_stay_readable() -> None:
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_the_checks_can_fail() -> None:
    """The graph is read for real: known arrows are there."""
    graph = _graph()
    assert "mfbatch.store.db" in graph["mfbatch.stages.score_inputs"]
    assert "mfbatch.errors" in graph["mfbatch.config.base"]
    assert _floor("mfbatch.serving.engines") > _floor("mfbatch.artifact.graph")
