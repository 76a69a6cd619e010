"""The package's shape holds: no import cycle among h1tune modules, small files and functions.

Every import counts, the lazy ones inside functions too: a cycle hidden in a function body still
ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "h1tune"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
# The numerical kernels keep the reference algorithms whole, with their comments (issue 9).
LONG_FUNCTIONS_ALLOWED = ("h1tune.ssm.",)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The h1tune modules `name` imports, anywhere in the file (`from pkg import submodule` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_h1tune_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 40, "the import walk found the package's imports"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring (Args sections are welcome, code is what must stay short)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1 + 1  # + the def line


def test_files_and_functions_stay_small():
    too_long = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(lines)} lines")
        if name.startswith(LONG_FUNCTIONS_ALLOWED):
            continue
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = _code_lines(node)
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


# The layers below the training loop: a reader of the loss, the batches, the data, the kernels, the
# adapters (probe included) or the evaluation never has to open train/ to follow them (issue 23).
BELOW_TRAIN = ("h1tune.lm", "h1tune.data", "h1tune.ssm", "h1tune.adapters", "h1tune.evaluation", "h1tune.export",
               "h1tune.precision", "h1tune.model", "h1tune.config")


def test_the_layers_below_train_do_not_import_it():
    modules = _modules()
    upward = sorted(f"{name} imports {target}" for name, path in modules.items() if name.startswith(BELOW_TRAIN)
                    for target in _imports(name, path, modules) if target.startswith("h1tune.train"))
    assert "h1tune.lm.loss" in modules and "h1tune.lm.batching" in modules
    assert upward == []
