"""The job-control options of ``@priority_task``: unique, unique_key, throttle, debounce.

Checked when the module is imported (:func:`check_job_options`); per call, :func:`unique_header`
gives the ``taskyard_unique`` header the broker's publish script acts on (the lock itself lives
in the broker, ``taskyard.broker.control.jobs``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from typing import Any

from taskyard.errors import ConfigurationError
from taskyard.keys import Keys

#: The options this module owns, as the decorators take them.
JOB_OPTIONS = ("unique", "unique_key", "throttle", "debounce")
UNIQUE_MODES = ("queued", "active")
#: A debounce lock outlives its delay by this much (s), so a call made just as the pending
#: message became due still finds the lock (and then publishes a new message).
DEBOUNCE_SLACK_S = 60.0


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(
            f"{name}={value!r} is not allowed; expected a positive number of seconds",
            setting=name,
            value=value,
        )
    return float(value)


def check_job_options(options: dict[str, Any], fn: Any = None) -> dict[str, Any]:
    """Pop and check the job options; returns the task attributes they become.

    Raises:
        ConfigurationError: an unknown mode, a non-positive window, two modes at once, or a
            ``unique_key`` that is not argument names of ``fn`` or a callable.
    """
    unique = options.pop("unique", None)
    unique_key = options.pop("unique_key", None)
    throttle = _seconds("throttle", options.pop("throttle", None))
    debounce = _seconds("debounce", options.pop("debounce", None))
    if unique is not None and unique not in UNIQUE_MODES:
        raise ConfigurationError(
            f"unique={unique!r} is not allowed; expected one of {', '.join(UNIQUE_MODES)}",
            setting="unique",
            value=unique,
        )
    chosen = [
        name
        for name, value in (("unique", unique), ("throttle", throttle), ("debounce", debounce))
        if value is not None
    ]
    if len(chosen) > 1:
        raise ConfigurationError(
            f"{' and '.join(chosen)} cannot be combined; choose one per task", setting=chosen[1]
        )
    if unique_key is not None:
        if not chosen:
            raise ConfigurationError(
                "unique_key= needs unique=, throttle= or debounce=", setting="unique_key"
            )
        if isinstance(unique_key, str):
            unique_key = (unique_key,)
        if callable(unique_key):
            pass
        elif isinstance(unique_key, tuple | list) and all(isinstance(n, str) for n in unique_key):
            unique_key = tuple(unique_key)
            if fn is not None and callable(fn):
                _check_names(fn, unique_key)
        else:
            raise ConfigurationError(
                f"unique_key={unique_key!r} is not allowed; expected argument names or a "
                "callable taking the task's arguments",
                setting="unique_key",
                value=unique_key,
            )
    if not chosen:
        return {}
    return {
        "taskyard_unique": unique,
        "taskyard_unique_key": unique_key,
        "taskyard_throttle": throttle,
        "taskyard_debounce": debounce,
    }


def _check_names(fn: Any, names: tuple[str, ...]) -> None:
    target = getattr(fn, "run", fn)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for name in names:
        if name not in params:
            raise ConfigurationError(
                f"unique_key names {name!r}, which is not an argument of "
                f"{getattr(fn, '__name__', fn)!r} (arguments: {', '.join(params)})",
                setting="unique_key",
                value=name,
            )


def _material(task: Any, args: Any, kwargs: Any) -> Any:
    key: Callable[..., Any] | tuple[str, ...] | None = task.taskyard_unique_key
    if key is None:
        return [list(args), kwargs]
    if callable(key):
        return key(*args, **kwargs)
    bound = inspect.signature(task.run).bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return {name: bound.arguments.get(name) for name in key}


def unique_header(
    task: Any, args: Any, kwargs: Any, keys: Keys, unique_ttl_s: float
) -> list[Any] | None:
    """[mode, lock key, lock TTL (ms)] of one call, or None for a task without job options.

    The lock key is given after ``keys.script_prefix()``: the scripts prepend the prefix they
    get (kombu's global key prefix included).
    """
    if task.taskyard_unique:
        mode, ttl_s = task.taskyard_unique, unique_ttl_s
    elif task.taskyard_throttle:
        mode, ttl_s = "throttle", task.taskyard_throttle
    elif task.taskyard_debounce:
        mode, ttl_s = "debounce", task.taskyard_debounce + DEBOUNCE_SLACK_S
    else:
        return None
    material = _material(task, args or (), kwargs or {})
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=repr)
    digest = hashlib.sha1(text.encode()).hexdigest()[:32]
    lock = keys.unique_lock(task.name, digest)[len(keys.script_prefix()) :]
    return [mode, lock, int(ttl_s * 1000)]
