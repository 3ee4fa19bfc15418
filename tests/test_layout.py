"""The package's shape: stage packages that import only ``core`` and earlier stages, no import
cycles, our own modules imported at the top, and modules small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lora_helpers"
# Lower layers first: a module may import its own layer and the layers before it.
LAYERS = ["core", "prepare", "caption", "train", "generate", "evaluate", "ui", "top"]
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # lora_helpers/__init__.py: only the version
        return "core"
    return parts[1] if len(parts) > 2 or parts[1] in LAYERS else "top"


def _imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported lora_helpers module, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as top
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_helpers"):
            for alias in node.names:  # `from lora_helpers.core import run_folder` imports a module
                sub = f"{node.module}.{alias.name}"
                names.append(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("lora_helpers")]
        found += [(name, node.lineno, id(node) in top_level) for name in names if name in modules]
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {name: _imports(path, set(files)) for name, path in files.items()}
    graph = {name: {target for target, _, _ in found if target != name} for name, found in edges.items()}
    return graph, edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = _graph()
    # A package's __init__ imports its own modules; an edge back from them to the package is not a cycle
    # of code, so __init__ modules are left out.
    inits = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    graph = {k: v - inits for k, v in graph.items() if k not in inits}
    assert _cycles(graph) == []


def test_stages_import_only_core_and_earlier_stages():
    _, edges = _graph()
    upward = []
    for module, found in edges.items():
        for target, line, _ in found:
            if LAYERS.index(_layer(target)) > LAYERS.index(_layer(module)):
                upward.append(f"{module}:{line} imports {target}")
    assert upward == []


def test_our_own_modules_are_imported_at_the_top():
    """Imports inside functions hid the cycles; ours are cheap, so they belong at the top."""
    _, edges = _graph()
    hidden = [f"{module}:{line} imports {target}" for module, found in edges.items()
              for target, line, top in found if not top]
    assert hidden == []


def test_modules_stay_readable():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_finds_cycles_and_upward_imports():
    # The checks above must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("lora_helpers.core.config") == "core" and _layer("lora_helpers.colab") == "top"
    assert _layer("lora_helpers") == "core" and _layer("lora_helpers.train") == "train"
    assert LAYERS.index(_layer("lora_helpers.evaluate.metrics")) > LAYERS.index(_layer("lora_helpers.train.loop"))
