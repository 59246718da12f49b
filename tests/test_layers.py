"""Imports run one way, as ``shared/design.md`` draws the packages, and no two modules import
each other.

Read from the source with :mod:`ast`. The direction check takes every import (at module level
or inside a function, under ``TYPE_CHECKING`` or not), so a back-edge fails here before it
becomes an import cycle. The circle check takes the imports that run: at module level and inside
functions (an import moved into a function to dodge a cycle is still a circle in the design),
not those under ``TYPE_CHECKING``, which only name a type for the checker and never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "taskyard"

#: part -> parts it must not import. A part is a subpackage or a top-level module.
PERIODIC = {"cache", "maintenance", "database", "beat"}
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"*"},
    "keys": {"*"},
    "config": {"*"} - {"errors"},
    "routing": {"batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    "broker": {"batching", "monitoring", "deadletters"} | PERIODIC,
    "deadletters": {"monitoring"} | PERIODIC,
    "batching": {"monitoring", "workers"} | PERIODIC,
    "workers": {"monitoring", "batching"} | PERIODIC,
    # The periodic jobs: each may use the others (warming runs single-flight from beat).
    **{part: {"monitoring", "batching"} for part in PERIODIC},
    "flow": {"batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    "monitoring": set(),
    # Shared by every part: they know none of the parts above them.
    "runtime": {"batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    "signals": {"*"},
    # The one Lua runner: every part runs its scripts through it, so it knows none of them.
    "lua": {"*"} - {"errors"},
    # Declarations of library internals relied on: every part may import it, it imports none.
    "seams": {"*"},
    # Tracing hooks Celery's signals only; every part may be traced, none is imported.
    "tracing": {"batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    "results": {"routing", "batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    # Redaction is read by routing (the option) and every view: it knows no part.
    "redaction": {"routing", "batching", "monitoring", "workers", "broker", "deadletters"}
    | PERIODIC,
}
#: Parts every part may import: they hold declarations only and import nothing of taskyard.
EVERYWHERE = {"seams"}
#: Parts that know nothing of taskyard but its errors.
ERRORS_ONLY = {"config", "lua"}
#: Parts only the wiring imports: ``create_app`` and the command line sit on top of everything.
TOP = {"app", "cli", "devstack"}
#: Parts allowed to import the top: the public package, the command line itself, and the stats
#: API, which builds its one app when it is given settings only.
MAY_IMPORT_TOP = {"__init__", "app", "cli", "devstack", "monitoring", "testing"}


def _part(module: str) -> str:
    """``taskyard.batching.flush`` -> ``batching``; ``taskyard`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path, package: Path) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    names = list(relative.parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _imports(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_of(path, package_dir)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "taskyard":
                # ``from taskyard import signals`` imports the module ``taskyard.signals``.
                found.extend((node.lineno, f"taskyard.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, target))
    return [
        (line, name) for line, name in found if name == "taskyard" or name.startswith("taskyard.")
    ]


def _edges(package: Path) -> list[tuple[str, int, str, str]]:
    edges = []
    for path in sorted(package.rglob("*.py")):
        source = _part(_module_of(path, package))
        for line, target in _imports(path, package):
            edges.append((str(path.relative_to(package)), line, source, _part(target)))
    return edges


def _wrong(source: str, target: str) -> bool:
    forbidden = FORBIDDEN.get(source, set())
    if target in EVERYWHERE:
        return False
    if "*" in forbidden:
        return target not in ({"errors"} if source in ERRORS_ONLY else set())
    if target in TOP:
        return source not in MAY_IMPORT_TOP
    if target == "monitoring":
        # Monitoring is an add-on: only the wiring knows it is there.
        return source not in TOP | {"__init__"}
    return target in forbidden


def back_edges(package: Path = PACKAGE) -> list[str]:
    """Every import that runs against the design's direction, as ``file:line: a -> b``."""
    return [
        f"{where}:{line}: {source} -> {target}"
        for where, line, source, target in _edges(package)
        if source != target and _wrong(source, target)
    ]


def test_imports_run_one_way() -> None:
    assert back_edges() == []


def test_the_check_sees_a_back_edge(tmp_path: Path) -> None:
    """The check itself fails on imports against the direction, inside functions too."""
    fake = tmp_path / "taskyard"
    (fake / "batching").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "batching" / "__init__.py").write_text("")
    (fake / "batching" / "x.py").write_text(
        "def f():\n    from taskyard.monitoring.store import StatsStore\n"
    )
    (fake / "routing.py").write_text("from . import batching\n")
    assert back_edges(fake) == [
        "batching/x.py:2: batching -> monitoring",
        "routing.py:1: routing -> batching",
    ]


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports under ``node`` that run (anywhere but in an ``if TYPE_CHECKING:`` body)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for branch in child.orelse:
                yield from _runtime_imports(branch)
        else:
            yield from _runtime_imports(child)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports when it runs. ``from a import b`` names
    module ``a.b`` when that is a module, else ``a`` itself (a name ``a`` defines or re-exports);
    the parent packages Python imports on the way are not edges of the design."""
    paths = {_module_of(path, package): path for path in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                parts = base.split(".")
                parts = parts[: len(parts) - node.level + 1]
                source = ".".join([*parts, node.module] if node.module else parts)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in paths else source)
        graph[module] = {target for target in targets if target in paths and target != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The import circles of ``graph``: its strongly connected parts of two modules or more
    (Tarjan's algorithm, iterative, so a deep package cannot exhaust the stack)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.add(member)
                    if member == node:
                        break
                if len(part) > 1:
                    found.append(frozenset(part))
    return found


def test_no_circle_between_modules() -> None:
    unexpected = [sorted(part) for part in circles(import_graph())]
    assert unexpected == [], "modules that import each other (directly or round a loop)"


def test_the_check_sees_a_planted_circle(tmp_path: Path) -> None:
    """The circle check fails on a loop of three modules made by an import inside a function,
    and leaves a type-only back-reference under TYPE_CHECKING alone."""
    fake = tmp_path / "taskyard"
    (fake / "batching").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "batching" / "__init__.py").write_text("")
    (fake / "batching" / "a.py").write_text("from taskyard.batching import b\n")
    (fake / "batching" / "b.py").write_text("from . import c\n")
    (fake / "batching" / "c.py").write_text("def f():\n    from taskyard.batching.a import x\n")
    (fake / "errors.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from taskyard import keys\n"
    )
    (fake / "keys.py").write_text("from taskyard.errors import E\n")
    graph = import_graph(fake)
    assert graph["taskyard.batching.c"] == {"taskyard.batching.a"}
    assert graph["taskyard.errors"] == set()
    assert circles(graph) == [
        frozenset({"taskyard.batching.a", "taskyard.batching.b", "taskyard.batching.c"})
    ]
