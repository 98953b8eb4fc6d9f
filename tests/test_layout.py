"""The shape of gateway/ and the bundled plugins: no import circle, no import from a lower layer up to a
higher one (docs/architecture.md draws the layers), and no function or class too long to read whole. Every
import counts, a lazy one inside a function and a TYPE_CHECKING one included: each is a dependency a reader has
to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own layer and the ones below it; `gateway` itself (the package's face)
# re-exports the plugin contract, so importing a name from it counts as importing gateway.plugin.
LAYERS: list[tuple[str, ...]] = [
    ("gateway.base",),
    ("gateway.plugin", "gateway.shared"),
    ("gateway.runtime",),
    ("gateway_torch", "gateway_onnx", "gateway_gguf", "gateway_static", "gateway_remote", "gateway_ray"),
    ("gateway.embedding",),
    ("gateway.api",),
    ("gateway.processes",),
    ("gateway.cli", "gateway.__main__", "gateway"),
]


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return rank


def _modules() -> dict[str, Path]:
    found = {}
    for base in (ROOT, ROOT / "plugins"):
        for top in ("gateway", *LAYERS[3]):
            folder = base / top
            if not folder.is_dir():
                continue
            for file in folder.rglob("*.py"):
                parts = file.relative_to(base).with_suffix("").parts
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                found[name] = file
    return found


def _imports(name: str, file: Path, known: set[str]) -> set[str]:
    """The project's modules that `file` imports (a name imported from a package counts as its module when
    it is one)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target == "gateway" and name != "gateway":
                target = "gateway.plugin"
            if target and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, file, set(modules)) for name, file in modules.items()}


def test_every_module_belongs_to_a_layer(graph: dict[str, set[str]]) -> None:
    for name in graph:
        _layer(name)


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(name)
    )


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_runs_from_a_lower_layer_up(graph: dict[str, set[str]]) -> None:
    upward = _upward(graph)
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    circles = _circles(graph)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checks_see_a_circle_and_an_upward_import(graph: dict[str, set[str]], tmp_path: Path) -> None:
    """The checks themselves: the real graph with two faults added is refused, and a lazy import inside a
    function is read (so the tests above cannot pass by reading too little)."""
    faulty = {name: set(targets) for name, targets in graph.items()}
    faulty["gateway.base.config"].add("gateway.api.app")  # up three layers, and a circle through app's imports
    assert _upward(faulty) == ["gateway.base.config (layer 0) imports gateway.api.app (layer 5)"]
    assert any({"gateway.base.config", "gateway.api.app"} <= set(c) for c in _circles(faulty))
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from gateway.embedding import cache\n")
    assert _imports("gateway.base.lazy", module, set(graph)) == {"gateway.embedding.cache"}


# A reader should take in a function at a glance and a class in one sitting; where one must stay whole, its
# docstring says why, starting with "Kept whole:".
MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 250


def _oversized(file: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
        if lines > limit and not (ast.get_docstring(node) or "").startswith("Kept whole:"):
            where = file.relative_to(ROOT) if file.is_relative_to(ROOT) else file.name
            found.append(f"{where}:{node.lineno} {node.name}: {lines} lines (limit {limit})")
    return found


def test_no_function_over_50_lines_and_no_class_over_250() -> None:
    over = [line for file in _modules().values() for line in _oversized(file)]
    assert not over, "split by job, or say why it must stay whole:\n" + "\n".join(over)


def test_the_size_check_sees_a_long_function(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(50))
    module.write_text(f'def long():\n{body}\n\n\ndef kept():\n    """Kept whole: a probe."""\n{body}\n')
    assert _oversized(module) == [f"probe.py:1 long: 51 lines (limit {MAX_FUNCTION_LINES})"]
