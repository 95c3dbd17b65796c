"""The package's shape: the training path imports no tool, and no two modules import each other."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dks_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The dks_jax modules ``path`` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in modules else node.module)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        # A package's __init__ runs before its modules: importing a sibling's package is no edge.
        graph[name] = _imports(path, modules) - {name} - parents
    return graph


def _cycle(graph) -> list[str] | None:
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "dks_jax.train" in graph and "dks_jax.tools.sweep" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # The detector finds a cycle when there is one.
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_training_path_imports_no_tool():
    graph = import_graph()
    core = [m for m in graph if not m.startswith("dks_jax.tools")]
    for module in core:
        assert not any(m.startswith("dks_jax.tools") for m in graph[module]), module
    # And at run time: importing the trainer loads no tool module.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, dks_jax.train, dks_jax.main; "
         "print(sorted(m for m in sys.modules if m.startswith('dks_jax.tools')))"],
        capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
