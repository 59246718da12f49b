"""Declarations of what taskyard relies on inside Celery, kombu, billiard, redis-py and Flower.

A module that reaches into a library's internals (an underscore name, a subclass overriding a
private method, a patched attribute, a fixed value of the library's) declares each name beside
the code, in one form::

    SEAMS = (
        Seam("kombu.transport.redis.Channel", "_brpop_start", "callable", params=("timeout",)),
        Seam("kombu.transport.redis.MultiChannelPoller", "_paused_brpop", "instance"),
    )

``tests/test_seams.py`` imports every module of the package, collects every ``SEAMS`` and checks
each against the installed libraries with :func:`problem`, so a release that renames or removes
one fails that one test, naming the module that relies on it. This module imports nothing of
taskyard (every part may import it) and does no I/O until :func:`problem` is called.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

#: What a seam names:
#: ``callable``: a function or method (``params``: its leading parameter names, self excluded);
#: ``class``: a class; ``attribute``: a value found on the target itself (class or module;
#: ``value``: its expected value); ``instance``: an attribute the library sets on objects at run
#: time, so it is on no class: an assignment ``<obj>.<name> = ...`` in the target's source (a
#: class and its bases, or a module).
Kind = Literal["callable", "class", "attribute", "instance"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


@dataclass(frozen=True, slots=True)
class Seam:
    """One name of a library that taskyard relies on, checked by ``tests/test_seams.py``."""

    #: Dotted path of the owner: a module, or a class or object inside one.
    target: str
    #: The attribute of the owner relied on.
    name: str
    kind: Kind = "callable"
    #: For ``callable``: the leading parameter names after ``self``/``cls``, in order.
    params: tuple[str, ...] | None = None
    #: For ``attribute``: the value relied on (compared with ``==``).
    value: Any = UNSET

    def __str__(self) -> str:
        return f"{self.target}.{self.name} ({self.kind})"


def resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(f"no module in {path!r}")


def _assigned_on_instances(owner: Any, name: str) -> bool:
    pattern = re.compile(rf"\.{re.escape(name)}\s*(?::[^=\n]+)?=(?!=)")
    owners = inspect.getmro(owner) if isinstance(owner, type) else (owner,)
    for part in owners:
        if part is object:
            continue
        try:
            source = inspect.getsource(part)
        except (OSError, TypeError):
            continue
        if pattern.search(source):
            return True
    return False


def _leading_params(function: Any) -> list[str]:
    names = list(inspect.signature(function).parameters)
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def problem(seam: Seam) -> str | None:
    """What is wrong with ``seam`` in the installed libraries, or None when it holds."""
    try:
        owner = resolve(seam.target)
    except (ImportError, AttributeError) as exc:
        return f"{seam.target}: cannot be found ({exc})"
    if seam.kind == "instance":
        if not isinstance(owner, type | ModuleType):
            return f"{seam}: {seam.target} is neither a class nor a module"
        if _assigned_on_instances(owner, seam.name):
            return None
        return f"{seam}: no '<obj>.{seam.name} = ...' in the source of {seam.target}"
    try:
        found = inspect.getattr_static(owner, seam.name)
    except AttributeError:
        return f"{seam}: missing"
    if seam.kind == "class":
        return None if isinstance(found, type) else f"{seam}: not a class but {found!r}"
    if seam.kind == "attribute":
        if seam.value is UNSET or getattr(owner, seam.name) == seam.value:
            return None
        return f"{seam}: is {getattr(owner, seam.name)!r}, relied on as {seam.value!r}"
    value = getattr(owner, seam.name)
    if not callable(value):
        return f"{seam}: not callable but {value!r}"
    if seam.params is not None:
        try:
            names = _leading_params(value)
        except (TypeError, ValueError):
            return f"{seam}: its signature cannot be read"
        if names[: len(seam.params)] != list(seam.params):
            return f"{seam}: parameters {names}, relied on as starting {list(seam.params)}"
    return None
