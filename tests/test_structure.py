"""Structure the design promises, checked on the source (AST), not by convention:

* the runtime library never imports `training` (nor torch), and its import graph has no cycle
  (imports under `if TYPE_CHECKING:` are for type checkers and do not count);
* no function outside bench/ is longer than 80 lines;
* `FeatureState.compute` has exactly one caller, the request scorer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Modules `name` imports at run time (top level or inside functions), resolved to module names."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in known else base


def _graph() -> dict[str, set[str]]:
    known = _modules("recsys")
    return {name: set(_imports(name, path, known)) for name, path in known.items()}


def test_runtime_never_imports_training_or_torch() -> None:
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if target.split(".")[0] in ("training", "torch")
    )
    assert not bad, bad


def test_recsys_import_graph_has_no_cycle() -> None:
    graph = {name: {t for t in targets if t.startswith("recsys")} for name, targets in _graph().items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, " -> ".join(cycle)


def _functions() -> Iterator[tuple[str, int]]:
    for package in ("recsys", "training", "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "proto" in path.parts:
                continue  # generated gRPC stubs
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{rel}:{node.name}", (node.end_lineno or node.lineno) - node.lineno + 1


def test_no_function_is_over_80_lines() -> None:
    long = {name: n for name, n in _functions() if n > MAX_LINES}
    assert not long, f"split these into readable parts (at most {MAX_LINES} lines each): {long}"


def test_feature_state_compute_has_one_caller() -> None:
    callers = []
    for package in ("recsys", "training"):  # bench/'s naive per-candidate loops call it on purpose
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compute":
                    callers.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert len(callers) == 1 and callers[0].startswith("recsys/scoring/request.py"), callers
