"""The package's layers, enforced by reading the source (``ast``; nothing is imported).

Layers, lowest first (a module may import its own layer and lower ones only)::

    base (medxfer/__init__, atomic, jsonfile, device, distributed, resources) -> data -> planning -> transforms
    -> networks -> losses | metrics -> transfer -> transferability -> handlers -> workflows
    -> study -> demo -> cli

``losses`` and ``metrics`` share one level and do not import each other. On top of the order:
no import cycle between packages, none between modules (every import counted, also one left
inside a function), and no import of a medxfer module inside a function or method body (medxfer
imports go to the top of the file; only heavy optional third-party libraries may stay lazy).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "medxfer"

#: Modules of the bottom layer; every other module belongs to its top-level package (``data``...)
#: or is one itself (``study``, ``demo``, ``cli``).
BASE_MODULES = {"medxfer", "medxfer.atomic", "medxfer.jsonfile", "medxfer.device", "medxfer.distributed",
                "medxfer.resources"}

#: Lowest first; the groups of one tuple share a level and may not import each other.
LAYERS = (("base",), ("data",), ("planning",), ("transforms",), ("networks",), ("losses", "metrics"),
          ("transfer",), ("transferability",), ("handlers",), ("workflows",), ("study",), ("demo",), ("cli",))
LEVEL = {group: level for level, groups in enumerate(LAYERS) for group in groups}


@dataclass(frozen=True)
class Import:
    file: str          # path relative to the repository root
    line: int
    importer: str      # dotted module name
    imported: str      # dotted module name (the longest existing module the statement names)
    in_function: bool
    exists: bool = True

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.importer} -> {self.imported}"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def group_of(module: str) -> str:
    """The layer group of a module: ``base``, the top-level package (``data``...) or the module."""
    return "base" if module in BASE_MODULES else module.split(".")[1]


def collect_imports(source: str, module: str, file: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of a ``medxfer`` module in ``source`` (absolute, relative, ``from medxfer import x``)."""
    package = module if is_package else module.rpartition(".")[0]

    def known(name: str) -> tuple[str, bool]:
        """The longest existing module prefix of ``name`` and whether ``name`` itself exists."""
        probe = name
        while probe and probe not in modules:
            probe = probe.rpartition(".")[0]
        return probe or "medxfer", probe == name

    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[tuple[str, bool]] = []
            if isinstance(child, ast.Import):
                targets = [known(a.name) for a in child.names if a.name.split(".")[0] == "medxfer"]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "medxfer":
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        targets.append((sub, True) if sub in modules else known(base))
            for imported, exists in dict.fromkeys(targets):  # one record per statement and module
                found.append(Import(file, child.lineno, module, imported, inside, exists))
            visit(child, inside)

    visit(ast.parse(source, filename=file), False)
    return found


@functools.lru_cache(maxsize=None)
def package_imports() -> tuple[tuple[str, ...], tuple[Import, ...]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(p, PACKAGE_DIR): p for p in paths}
    imports = []
    for name, path in modules.items():
        rel = str(path.relative_to(PACKAGE_DIR.parent))
        imports += collect_imports(path.read_text(encoding="utf-8"), name, rel, path.name == "__init__.py", set(modules))
    return tuple(modules), tuple(imports)


def cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def shortest_cycle(component: list[str], edges: dict[tuple[str, str], list[Import]], start: str) -> list[str]:
    """The shortest path ``start -> ... -> start`` inside ``component`` (breadth first)."""
    members = set(component)
    graph = {v: sorted(b for (a, b) in edges if a == v and b in members) for v in component}
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")  # cannot happen in a component


def describe_cycles(edges: dict[tuple[str, str], list[Import]], kind: str, rank=lambda node: 0) -> str:
    """One line per cycle (the shortest through the component's lowest node by ``rank``), then the
    imports of each hop as ``file:line importer -> imported``."""
    lines = []
    for component in cycles(edges):
        path = shortest_cycle(component, edges, min(component, key=lambda v: (rank(v), v)))
        lines.append(f"cycle between {kind}: {' -> '.join(path)}  (component: {', '.join(component)})")
        for a, b in zip(path, path[1:]):
            where = edges[a, b]
            more = f"  (+{len(where) - 3} more)" if len(where) > 3 else ""
            lines += [f"  {a} -> {b}: {imp}" for imp in where[:3]]
            lines[-1] += more
    return "\n".join(lines)


# -- the walker itself -------------------------------------------------------------------------

def test_collector_resolves_absolute_relative_and_package_imports():
    modules = {"medxfer", "medxfer.jsonfile", "medxfer.data", "medxfer.data.msd", "medxfer.data.problems"}
    source = (
        "import os\n"
        "import medxfer.data.msd as msd\n"
        "from medxfer import jsonfile, __version__\n"
        "from .problems import DatasetError\n"
        "from . import problems\n"
        "from medxfer.data.missing import thing\n"
        "def f():\n"
        "    from medxfer.data.problems import read_json\n"
        "    return lambda: __import__('os')\n"
    )
    found = collect_imports(source, "medxfer.data.validate", "medxfer/data/validate.py", False, modules)
    assert [(i.line, i.imported, i.in_function, i.exists) for i in found] == [
        (2, "medxfer.data.msd", False, True),
        (3, "medxfer.jsonfile", False, True),
        (3, "medxfer", False, True),
        (4, "medxfer.data.problems", False, True),
        (5, "medxfer.data.problems", False, True),
        (6, "medxfer.data", False, False),
        (8, "medxfer.data.problems", True, True),
    ]


def test_cycle_report_names_each_hop():
    def imp(a, b, line):
        return Import(f"{a}.py", line, a, b, False)
    edges = {("a", "b"): [imp("a", "b", 1)], ("b", "c"): [imp("b", "c", 2)], ("c", "a"): [imp("c", "a", 3)],
             ("c", "d"): [imp("c", "d", 4)]}
    assert cycles(edges) == [["a", "b", "c"]]
    assert describe_cycles(edges, "modules").splitlines() == [
        "cycle between modules: a -> b -> c -> a  (component: a, b, c)",
        "  a -> b: a.py:1 a -> b", "  b -> c: b.py:2 b -> c", "  c -> a: c.py:3 c -> a"]
    assert describe_cycles({("a", "b"): [imp("a", "b", 1)]}, "modules") == ""


def test_walker_sees_the_package():
    modules, imports = package_imports()
    assert "medxfer.cli" in modules and "medxfer.data.msd" in modules
    assert len(imports) > 100
    assert any(i.importer == "medxfer.cli" for i in imports)


# -- the rules ---------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    modules, _ = package_imports()
    unplaced = sorted(m for m in modules if group_of(m) not in LEVEL)
    assert not unplaced, ("modules outside the layer table of tests/test_layers.py (place them in LAYERS "
                          "or BASE_MODULES):\n" + "\n".join(f"  {m}" for m in unplaced))


def test_imported_medxfer_modules_exist():
    _, imports = package_imports()
    missing = [i for i in imports if not i.exists]
    assert not missing, "imports of medxfer modules that do not exist (file:line importer -> nearest existing " \
                        "parent):\n" + "\n".join(f"  {i}" for i in missing)


def test_imports_only_go_down_the_layers():
    _, imports = package_imports()
    bad = []
    for imp in imports:
        a, b = group_of(imp.importer), group_of(imp.imported)
        if a != b and LEVEL.get(b, -1) >= LEVEL.get(a, -1):
            why = "same level, peers may not import each other" if LEVEL.get(b) == LEVEL.get(a) else "higher layer"
            bad.append(f"  {imp}   ({a} -> {b}: {why})")
    order = " -> ".join(" | ".join(groups) for groups in LAYERS)
    assert not bad, f"imports against the layer order {order}:\n" + "\n".join(bad)


def test_package_init_imports_base_modules_only():
    _, imports = package_imports()
    bad = [i for i in imports if i.importer == "medxfer" and i.imported not in BASE_MODULES]
    assert not bad, "medxfer/__init__.py must not import higher layers:\n" + "\n".join(f"  {i}" for i in bad)


def test_no_cycle_between_packages():
    _, imports = package_imports()
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in imports:
        a, b = group_of(imp.importer), group_of(imp.imported)
        if a != b:
            edges.setdefault((a, b), []).append(imp)
    message = describe_cycles(edges, "packages", rank=lambda group: LEVEL.get(group, -1))
    assert not message, message


def test_no_cycle_between_modules():
    _, imports = package_imports()
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in imports:  # top-level and in-function imports alike
        if imp.importer != imp.imported:
            edges.setdefault((imp.importer, imp.imported), []).append(imp)
    message = describe_cycles(edges, "modules")
    assert not message, message


def test_no_medxfer_import_inside_functions():
    _, imports = package_imports()
    lazy = [i for i in imports if i.in_function]
    assert not lazy, ("imports of medxfer modules inside a function or method (move them to the top of the "
                      "file):\n" + "\n".join(f"  {i.file}:{i.line} {i.imported}" for i in lazy))
