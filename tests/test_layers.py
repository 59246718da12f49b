"""Imports run one way, as ``shared/design.md`` draws the packages.

Read from the source with :mod:`ast` (every import, at module level or inside a function, under
``TYPE_CHECKING`` or not), so a back-edge fails here before it becomes an import cycle.
"""

from __future__ import annotations

import ast
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
    "monitoring": set(),
    # Shared by every part: they know none of the parts above them.
    "runtime": {"batching", "monitoring", "workers", "broker", "deadletters"} | PERIODIC,
    "signals": {"*"},
    # The one Lua runner: every part runs its scripts through it, so it knows none of them.
    "lua": {"*"} - {"errors"},
    # Declarations of library internals relied on: every part may import it, it imports none.
    "seams": {"*"},
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
