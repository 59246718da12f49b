"""Every seam taskyard declares (``SEAMS`` beside the code, :mod:`taskyard.seams`) holds in the
installed Celery, kombu, billiard, redis-py and Flower; none is exempted.

Checks of a library's behaviour (what its source does with a name, not whether the name is
there) stay with the tests of the module that relies on it.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

import taskyard
from taskyard.seams import Seam, problem

PACKAGE = Path(taskyard.__file__).resolve().parent
LIBRARIES = ("celery", "kombu", "billiard", "redis", "flower")

#: The modules known to reach into the libraries; a module may join, none may silently leave.
DECLARING = {
    "taskyard.broker.control.bulk",
    "taskyard.broker.control.service",
    "taskyard.broker.delays",
    "taskyard.broker.publish",
    "taskyard.broker.transport",
    "taskyard.config",
    "taskyard.deadletters.consumer",
    "taskyard.flow",
    "taskyard.monitoring.capture",
    "taskyard.monitoring.events",
    "taskyard.monitoring.flower",
    "taskyard.monitoring.queues",
    "taskyard.routing.binding",
    "taskyard.routing.options",
    "taskyard.runtime",
    "taskyard.serialization",
    "taskyard.workers.guards.install",
    "taskyard.workers.shutdown",
    "taskyard.workers.speedups",
    "taskyard.workers.urgent",
}


def modules(package: str) -> list[ModuleType]:
    """Every module of ``package``, imported (``__main__`` modules excepted: they run)."""
    root = importlib.import_module(package)
    found = [root]
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if not info.name.endswith(".__main__"):
            found.append(importlib.import_module(info.name))
    return found


def declarations(package: str) -> dict[str, tuple[Seam, ...]]:
    """Module name -> its ``SEAMS``, for every module of ``package`` that declares some."""
    out: dict[str, tuple[Seam, ...]] = {}
    for module in modules(package):
        seams = vars(module).get("SEAMS")
        if seams is None:
            continue
        assert isinstance(seams, tuple) and seams, f"{module.__name__}: SEAMS is not a tuple"
        assert all(isinstance(s, Seam) for s in seams), f"{module.__name__}: not all Seam"
        out[module.__name__] = seams
    return out


def problems(package: str) -> list[str]:
    return [
        f"{name}: {found}"
        for name, seams in sorted(declarations(package).items())
        for seam in seams
        if (found := problem(seam)) is not None
    ]


def test_every_declared_seam_holds_in_the_installed_libraries() -> None:
    assert problems("taskyard") == []


def test_the_modules_that_reach_into_the_libraries_declare_their_seams() -> None:
    declared = set(declarations("taskyard"))
    assert declared >= DECLARING, sorted(DECLARING - declared)
    assert declared <= DECLARING, f"add {sorted(declared - DECLARING)} to DECLARING"


def _reaches_in(path: Path) -> list[str]:
    """Reaches into a library that the source shows plainly: a private module imported, or a
    library class subclassed with a private method overridden."""
    tree = ast.parse(path.read_text())
    found: list[str] = []
    library_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            top = node.module.split(".")[0]
            if top in LIBRARIES:
                if any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"imports {node.module}")
                library_names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in LIBRARIES:
                    library_names.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {ast.unparse(base).split(".")[0] for base in node.bases}
        if not bases & library_names:
            continue
        private = [
            item.name
            for item in node.body
            if isinstance(item, ast.FunctionDef)
            and item.name.startswith("_")
            and not item.name.startswith("__")
        ]
        if private:
            found.append(f"class {node.name} overrides {private}")
    return found


def test_a_module_that_plainly_reaches_in_is_among_the_declaring() -> None:
    undeclared = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(part for part in relative.parts if part != "__init__")
        reasons = _reaches_in(path)
        if reasons and name not in DECLARING:
            undeclared[name] = reasons
    assert undeclared == {}


# --- the check itself fails on what it must catch -----------------------------------------
def test_the_scan_sees_a_plain_reach_in(tmp_path: Path) -> None:
    planted = tmp_path / "m.py"
    planted.write_text(
        "from celery._state import get_current_app\n"
        "from kombu.transport import redis as kr\n"
        "class C(kr.Channel):\n"
        "    def _brpop_start(self, timeout=None): ...\n"
        "    def public(self): ...\n"
    )
    assert _reaches_in(planted) == ["imports celery._state", "class C overrides ['_brpop_start']"]


def test_a_planted_missing_name_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "plantedpkg"
    (planted / "sub").mkdir(parents=True)
    (planted / "__init__.py").write_text("")
    (planted / "sub" / "__init__.py").write_text("")
    (planted / "sub" / "mod.py").write_text(
        "from taskyard.seams import Seam\n"
        "SEAMS = (\n"
        "    Seam('kombu.transport.redis.Channel', '_brpop_start'),\n"
        "    Seam('kombu.transport.redis.MultiChannelPoller', '_paused_brpop_gone', 'instance'),\n"
        ")\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = problems("plantedpkg")
    finally:
        for name in [n for n in sys.modules if n.startswith("plantedpkg")]:
            del sys.modules[name]
    assert len(found) == 1
    assert found[0].startswith("plantedpkg.sub.mod: ")
    assert "_paused_brpop_gone" in found[0]


@pytest.mark.parametrize(
    "seam",
    [
        Seam("kombu.transport.redis.Channel", "_no_such_method"),
        Seam("kombu.transport.no_such_module.Channel", "_brpop_start"),
        Seam("kombu.transport.redis.Channel", "_brpop_start", params=("not_timeout",)),
        Seam("kombu.transport.redis.Channel", "unacked_key", "attribute", value="acked"),
        Seam("kombu.transport.redis.Channel", "unacked_key", "callable"),
        Seam("kombu.transport.redis.Channel", "unacked_key", "class"),
        Seam("kombu.transport.redis.MultiChannelPoller", "_no_such_table", "instance"),
        Seam("kombu.transport.redis.PRIORITY_STEPS", "_x", "instance"),
    ],
    ids=str,
)
def test_each_kind_of_check_fails_on_a_broken_seam(seam: Seam) -> None:
    assert problem(seam) is not None


def test_each_kind_of_check_passes_on_a_real_seam() -> None:
    for seam in (
        Seam("kombu.transport.redis.Channel", "_brpop_start", params=("timeout",)),
        Seam("kombu.transport.redis.Channel", "unacked_key", "attribute", value="unacked"),
        Seam("kombu.transport.redis", "Channel", "class"),
        Seam("kombu.transport.redis.MultiChannelPoller", "_paused_brpop", "instance"),
    ):
        assert problem(seam) is None, seam
