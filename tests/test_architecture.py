"""The architecture, checked from the source text: the import graph of jaxmoe/ and converters/ has no cycle (imports
inside functions and `if TYPE_CHECKING:` included), the model library does not import the converters (only its CLI
joins them), neither imports the TPU kit, the logical-axis rules are a leaf, and no file is over 400 lines.

Nothing is imported to check this: every file is parsed with `ast`, so a module that would fail to import (or import
slowly) is checked all the same. How an import becomes an edge of the graph:
- `import a.b` -> a.b; `from a import b` -> a.b when that is a module, else a (the package's __init__, where the
  name is an attribute); `import a` -> a (its __init__); relative imports are resolved against the module's package.
- Parent packages are not edges: Python runs `a/__init__.py` before `a.b`, but a package that imports its own
  submodules is not a cycle with them, and our package __init__s are empty or load their submodules lazily.
- Imports by name through importlib cannot be seen by ast. There are two, both tables of module names, and the test
  reads the tables (DYNAMIC_TABLES): jaxmoe/__init__.py loads its public names on first attribute access (PEP 562)
  from `_LAZY` (name -> module), so `jaxmoe` counts as importing each of those modules; the CLI imports each
  subcommand from `COMMANDS` (name -> (module, help)). Any other call of importlib.import_module / __import__ fails
  the test until its table is added here, so no import escapes the graph unseen.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPH_PACKAGES = ("jaxmoe", "converters")  # the import graph: these packages and every edge between their modules
SIZE_DIRS = ("jaxmoe", "converters", "tpu", "benchmarks")
MAX_LINES = 400
# module -> the module-level table whose string values (or first string of each tuple value) it imports by name
DYNAMIC_TABLES = {"jaxmoe": "_LAZY", "jaxmoe.cli": "COMMANDS"}
RULES = "jaxmoe.parallel.rules"  # logical-axis rules: a leaf of the library, imported by nn, parallel and train


# --- the checker -----------------------------------------------------------------------------------------------
def discover(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the `packages` directories of `root`."""
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_from(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module named by `from {'.' * level}{target} import ...` inside `module`."""
    if not level:
        return target or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level > len(package):
        raise AssertionError(f"{module}: relative import beyond the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _first_string(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)) and node.elts:
        return _first_string(node.elts[0])
    return None


def _table_modules(tree: ast.Module, table: str) -> list[tuple[str, int]]:
    """(module, line) for each value of the module-level dict `table` (a string, or a tuple starting with one)."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == table for t in targets) and isinstance(node.value, ast.Dict):
                return [(s, v.lineno) for v in node.value.values if (s := _first_string(v))]
    raise AssertionError(f"no module-level dict {table} found for DYNAMIC_TABLES")


def _dynamic_import_lines(tree: ast.Module) -> list[int]:
    """Lines that import a module by a computed name (importlib.import_module(...), import_module(...),
    __import__(...))."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                lines.append(node.lineno)
    return lines


def imports_of(module: str, path: Path, known: set[str],
               dynamic: dict[str, str] | None = None) -> dict[str, int]:
    """Every module `module` (file `path`) imports -> the first line that does, at any depth (functions, classes,
    `if TYPE_CHECKING:`). Names outside `known` are kept as written (e.g. "numpy", "tpu.mesh_presets")."""
    dynamic = DYNAMIC_TABLES if dynamic is None else dynamic
    tree = ast.parse(path.read_text(), str(path))
    out: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target and target != module:
            out.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, _is_package(path), node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                add(sub if sub in known else base, node.lineno)
    if module in dynamic:
        for target, line in _table_modules(tree, dynamic[module]):
            add(target, line)
    elif lines := _dynamic_import_lines(tree):
        raise AssertionError(f"{path}:{lines[0]}: imports a module by a computed name, which this test cannot see; "
                             "add its table of module names to DYNAMIC_TABLES in tests/test_architecture.py")
    return out


def import_graph(root: Path, packages: tuple[str, ...],
                 dynamic: dict[str, str] | None = None) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """(module -> {imported module: line}, module -> file) for every module of `packages` under `root`."""
    modules = discover(root, packages)
    known = set(modules)
    return {m: imports_of(m, p, known, dynamic) for m, p in modules.items()}, modules


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, following only edges
    between modules of the graph: the modules of each group all import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] through each strongly connected component."""
    return [_cycle_in(graph, comp) for comp in strongly_connected(graph)]


def _cycle_in(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start, inside = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in inside and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen for a strongly connected component


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path], root: Path) -> str:
    """`a (a.py:12) -> b (b.py:40) -> a`: each module with the line that imports the next."""
    steps = [f"{a} ({files[a].relative_to(root)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# --- the checker on a tiny tree ---------------------------------------------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_checker_resolves_every_kind_of_import(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg\nimport numpy as np\n",
        "pkg/b.py": "from pkg import a, VALUE\nfrom . import c\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.d import D\n",
        "pkg/sub/__init__.py": "from . import d\nfrom .. import a\n",
        "pkg/sub/d.py": "def f():\n    from ..a import x\n    import pkg.sub\n",
    })
    graph, _ = import_graph(root, ("pkg",), {})
    assert graph["pkg.a"] == {"pkg": 1, "numpy": 2}  # a package import is an edge to its __init__
    assert graph["pkg.b"] == {"pkg.a": 1, "pkg": 1, "pkg.c": 2}  # a submodule, else the package (VALUE)
    assert graph["pkg.c"] == {"typing": 1, "pkg.sub.d": 3}  # under TYPE_CHECKING
    assert graph["pkg.sub"] == {"pkg.sub.d": 1, "pkg.a": 2}  # relative, from a package's __init__
    assert graph["pkg.sub.d"] == {"pkg.a": 2, "pkg.sub": 3}  # inside a function
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.d", "pkg.sub"]]


def test_checker_reports_a_planted_cycle(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "_LAZY = {'Model': 'pkg.model'}\n",  # lazy, by name: read from the table
        "pkg/model.py": "from pkg.layers import Layer\n",
        "pkg/layers.py": "import numpy\n\ndef build():\n    from pkg.config import Config\n",
        "pkg/config.py": "def load():\n    from pkg import Model  # through the package's lazy table\n",
        "pkg/leaf.py": "from pkg.layers import build\n",
    })
    graph, files = import_graph(root, ("pkg",), {"pkg": "_LAZY"})
    cycles = find_cycles(graph)
    assert cycles == [["pkg", "pkg.model", "pkg.layers", "pkg.config", "pkg"]]
    assert describe(cycles[0], graph, files, root) == (
        "pkg (pkg/__init__.py:1) -> pkg.model (pkg/model.py:1) -> pkg.layers (pkg/layers.py:4) -> "
        "pkg.config (pkg/config.py:2) -> pkg")
    (root / "pkg/config.py").write_text("def load():\n    return 1\n")  # the edge back removed: no cycle
    assert find_cycles(import_graph(root, ("pkg",), {"pkg": "_LAZY"})[0]) == []


def test_checker_refuses_imports_it_cannot_see(tmp_path):
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import importlib\nm = importlib.import_module('x')\n"})
    with pytest.raises(AssertionError, match=r"a\.py:2: imports a module by a computed name"):
        import_graph(root, ("pkg",), {})


# --- the project ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    return import_graph(ROOT, GRAPH_PACKAGES)


def test_no_import_cycles(project):
    graph, files = project
    assert len(graph) > 50 and "jaxmoe.nn.model" in graph and "converters.hf.config" in graph  # the tree is seen
    cycles = []
    for comp in strongly_connected(graph):
        cycle = _cycle_in(graph, comp)
        more = f"\n    (a group of {len(comp)} modules that all import each other: {', '.join(comp)})" \
            if len(comp) > len(cycle) - 1 else ""
        cycles.append(describe(cycle, graph, files, ROOT) + more)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_model_library_does_not_import_converters(project):
    graph, files = project
    bad = [f"{files[m].relative_to(ROOT)}:{line} imports {t}" for m, targets in sorted(graph.items())
           if _under(m, "jaxmoe") and not _under(m, "jaxmoe.cli")
           for t, line in targets.items() if _under(t, "converters")]
    assert not bad, "jaxmoe must not import converters (only jaxmoe.cli joins them):\n" + "\n".join(bad)


def test_nothing_imports_the_tpu_kit(project):
    graph, files = project
    bad = [f"{files[m].relative_to(ROOT)}:{line} imports {t}" for m, targets in sorted(graph.items())
           for t, line in targets.items() if _under(t, "tpu")]
    assert not bad, "tpu/ is not shipped with the package; jaxmoe and converters must not import it:\n" + \
        "\n".join(bad)


def test_axis_rules_are_a_leaf(project):
    graph, files = project
    assert RULES in graph, f"{RULES.replace('.', '/')}.py is missing"
    inner = {t: line for t, line in graph[RULES].items() if _under(t, "jaxmoe") or _under(t, "converters")}
    assert not inner, f"{files[RULES].relative_to(ROOT)} must import nothing from jaxmoe, imports {inner}"


def test_no_file_over_400_lines():
    sizes = {p: len(p.read_text().splitlines()) for d in SIZE_DIRS for p in sorted((ROOT / d).rglob("*.py"))}
    assert len(sizes) > 50
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p, n in sizes.items() if n > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)
