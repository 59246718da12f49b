"""Redacted arguments: secrets passed to tasks never reach a page, a terminal or Flower.

A value is withheld when its argument is named by the task's ``redact=(...)`` option or its
name (or any dict key inside an argument) matches the app-wide ``TASKYARD_REDACT_PATTERN``.
The stored message keeps every value, so a retry or a replay still runs with them; only what is
shown changes:

- at publish (``before_task_publish``, every publishing path), the message's ``argsrepr`` and
  ``kwargsrepr`` headers, which Flower and Celery's events show, are rewritten redacted, and a
  ``taskyard_redact`` header names the positional arguments to withhold, so a viewer that knows
  nothing of the task (the stats API, the CLI, another service's dashboard) redacts them too;
- every view (the dashboard, the API, the CLI, timelines, dead letters) passes arguments
  through :func:`redact_call` with that header and the pattern.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from celery import signals
from celery.utils.saferepr import saferepr

from taskyard.errors import ConfigurationError
from taskyard.runtime import Runtime, find_runtime, sending_app

#: What a withheld value is shown as.
REDACTED = "[redacted]"
#: Header naming what to withhold: {"a": [positional indices], "k": [keyword names]}.
HEADER = "taskyard_redact"
#: Nesting the view walks into arguments looking for keys to withhold; deeper is withheld whole.
MAX_DEPTH = 32
#: Length of the argsrepr/kwargsrepr headers (Celery's default for its own reprs).
REPR_MAX = 1024


def check_redact(value: Any) -> tuple[str, ...]:
    """The ``redact=`` option as a tuple of argument names.

    Raises:
        ConfigurationError: not a string or a sequence of identifiers.
    """
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Iterable) or isinstance(names, Mapping):
        raise ConfigurationError(
            f"redact={value!r} is not allowed; expected an argument name or a tuple of them, "
            'e.g. redact=("password", "card")',
            setting="redact",
            value=value,
        )
    checked = tuple(names)
    for name in checked:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(
                f"redact={value!r}: {name!r} is not an argument name; expected identifiers, "
                'e.g. redact=("password", "card")',
                setting="redact",
                value=value,
            )
    return checked


@lru_cache(maxsize=64)
def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigurationError(
            f"TASKYARD_REDACT_PATTERN={pattern!r} is not a regular expression: {exc}",
            setting="TASKYARD_REDACT_PATTERN",
            value=pattern,
        ) from None


def rule_for(fn: Callable[..., Any] | None, names: Sequence[str], pattern: str) -> dict[str, Any]:
    """The ``taskyard_redact`` header of a task: positional indices and keyword names whose
    values are withheld (by ``names`` or the pattern). Empty when nothing is."""
    compiled = compile_pattern(pattern)
    wanted = set(names)
    indices: list[int] = []
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        if params and params[0].name in ("self", "cls"):
            params = params[1:]  # a bound task's self is not in the message
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for index, param in enumerate(positional):
            if param.name in wanted or (compiled is not None and compiled.search(param.name)):
                indices.append(index)
    rule: dict[str, Any] = {}
    if indices:
        rule["a"] = indices
    if wanted:
        rule["k"] = sorted(wanted)
    return rule


def _withheld(key: Any, names: frozenset[str], compiled: re.Pattern[str] | None) -> bool:
    return isinstance(key, str) and (
        key in names or (compiled is not None and compiled.search(key) is not None)
    )


def _walk(value: Any, names: frozenset[str], compiled: re.Pattern[str] | None, depth: int) -> Any:
    if depth > MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _withheld(k, names, compiled) else _walk(v, names, compiled, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_walk(v, names, compiled, depth + 1) for v in value]
    return value


def redact_call(
    args: Any, kwargs: Any, rule: Mapping[str, Any] | None, pattern: str
) -> tuple[list[Any], dict[str, Any]]:
    """``args`` and ``kwargs`` as they may be shown: withheld values replaced by REDACTED."""
    compiled = compile_pattern(pattern)
    rule = rule if isinstance(rule, Mapping) else {}
    names = frozenset(str(n) for n in rule.get("k") or ())
    hidden = {i for i in rule.get("a") or () if isinstance(i, int)}
    shown_args = [
        REDACTED if i in hidden else _walk(v, names, compiled, 1)
        for i, v in enumerate(args if isinstance(args, list | tuple) else ())
    ]
    shown_kwargs = {
        str(k): REDACTED if _withheld(k, names, compiled) else _walk(v, names, compiled, 1)
        for k, v in (kwargs.items() if isinstance(kwargs, Mapping) else ())
    }
    return shown_args, shown_kwargs


def hidden_call() -> tuple[list[Any], dict[str, Any]]:
    """What a viewer without the right to see arguments is shown."""
    return [REDACTED], {}


# --- at publish -------------------------------------------------------------------------------
def _task_rule(app: Any, name: str, pattern: str) -> dict[str, Any]:
    task = app.tasks.get(name) if app is not None else None
    names = tuple(getattr(task, "taskyard_redact", ()) or ())
    fn = getattr(task, "run", None) if task is not None else None
    return rule_for(fn, names, pattern)


def _on_before_publish(
    sender: str | None = None, body: Any = None, headers: dict[str, Any] | None = None, **_: Any
) -> None:
    if headers is None or not isinstance(body, list | tuple) or len(body) < 2:
        return
    app = sending_app.get()
    if app is None:
        return
    runtime = find_runtime(app)
    if runtime is None:
        return
    name = str(headers.get("task") or sender or "")
    pattern = runtime.settings.redact_pattern
    task = app.tasks.get(name)
    rule: dict[str, Any] | None = getattr(task, "taskyard_redact_rule", None)
    if rule is None:
        rule = _task_rule(app, name, pattern)
        if task is not None:
            task.taskyard_redact_rule = rule  # computed once per task and process
    args, kwargs = body[0], body[1]
    compiled = compile_pattern(pattern)
    if not rule and not _any_match(args, compiled) and not _any_match(kwargs, compiled):
        return
    if rule:
        headers[HEADER] = rule
    shown_args, shown_kwargs = redact_call(args, kwargs, rule, pattern)
    headers["argsrepr"] = saferepr(tuple(shown_args), REPR_MAX)
    headers["kwargsrepr"] = saferepr(shown_kwargs, REPR_MAX)


def _any_match(value: Any, compiled: re.Pattern[str] | None, depth: int = 0) -> bool:
    """Whether any dict key inside ``value`` matches (the common case, none, stays cheap)."""
    if compiled is None or depth > MAX_DEPTH:
        return False
    if isinstance(value, Mapping):
        return any(
            (isinstance(k, str) and compiled.search(k) is not None)
            or _any_match(v, compiled, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list | tuple):
        return any(_any_match(v, compiled, depth + 1) for v in value)
    return False


_installed = False


def install(app: Any, runtime: Runtime) -> None:
    """Check the app-wide pattern and rewrite what published messages show (once per process)."""
    global _installed
    compile_pattern(runtime.settings.redact_pattern)
    if not _installed:
        _installed = True
        signals.before_task_publish.connect(_on_before_publish, weak=False)
