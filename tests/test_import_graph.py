"""The project's import graph has no cycles, between modules or between packages.

Every import counts: at the top of a module, inside a function, or under `TYPE_CHECKING`, since
each of them ties the two modules together for a reader and for a refactoring alike. The
packages are the ones pyproject.toml installs; tests are left out.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def project_packages() -> list[str]:
    """The top-level packages pyproject.toml installs (`include = ["pipeline*", ...]`)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(pattern.rstrip("*") for pattern in patterns)


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages."""
    modules = {}
    for package in project_packages():
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` imports, wherever the import stands."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports that module; `from module import name`, it
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` reaches a.b.c's module
                target = target.rpartition(".")[0]
            # importing a.b.c runs a/__init__ and a/b/__init__ first, unless they are this
            # module's own packages (already running when it is imported)
            own = {name.rsplit(".", depth)[0] for depth in range(name.count(".") + 1)}
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                reached = ".".join(parts[:depth])
                if reached in modules and reached not in own:
                    found.add(reached)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def module_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "; ".join(edges)


def test_the_graph_is_read():
    """The walk sees the imports it must see: a cycle test over an empty graph cannot fail."""
    graph = module_graph()
    assert {"cli", "pipeline", "flows", "model", "storage", "benchmarks"} <= set(project_packages())
    assert "model.checkpoint" in graph["model.train"]
    assert "storage.store" in graph["storage.inspect"]
    assert "benchmarks.all_neighbours" in graph["benchmarks.backbone"]  # `from pkg import module`


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_itself_back():
    graph = module_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(c, graph) for c in found)


def test_no_package_imports_itself_back():
    """The top-level packages form layers: cli <- storage <- pipeline <- model, flows <-
    benchmarks; no two of them import each other, through any of their modules."""
    packages: dict[str, set[str]] = {}
    for name, targets in module_graph().items():
        edges = packages.setdefault(name.partition(".")[0], set())
        edges.update(target.partition(".")[0] for target in targets)
    for source, edges in packages.items():
        edges.discard(source)
    found = cycles(packages)
    assert not found, "package cycles: " + " | ".join(describe(c, packages) for c in found)
