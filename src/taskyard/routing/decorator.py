"""``@priority_task``: place a task on one of the five levels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task, shared_task
from celery.local import PromiseProxy

from taskyard.errors import ConfigurationError
from taskyard.routing.levels import Priority, parse_level
from taskyard.routing.task import TaskyardTask

F = TypeVar("F", bound=Callable[..., Any])

_RESOURCE_OPTIONS = ("requires_memory_mb", "memory_limit_mb", "cpu_time_limit_s")


def _check_resources(options: dict[str, Any]) -> dict[str, float]:
    checked: dict[str, float] = {}
    for name in _RESOURCE_OPTIONS:
        value = options.pop(name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigurationError(
                f"{name}={value!r} is not allowed; expected a positive number", value=value
            )
        checked[name] = float(value)
    return checked


def _place(task: Any, level: Priority, attributes: dict[str, Any]) -> None:
    # The level is an attribute the router reads, not Celery's deprecated ``queue`` attribute:
    # a call's own queue still wins, as Celery merges call options over routes.
    task.taskyard_level = level
    for name, value in attributes.items():
        setattr(task, name, value)


@overload
def priority_task(fn: F, /) -> Any: ...


@overload
def priority_task(
    *, priority: str | Priority = ..., requires_memory_mb: float | None = ...,
    memory_limit_mb: float | None = ..., cpu_time_limit_s: float | None = ..., **options: Any,
) -> Callable[[Any], Any]: ...


def priority_task(fn: Any = None, /, *, priority: str | Priority = Priority.NORMAL,
                  **options: Any) -> Any:
    """Make ``fn`` a Celery task on ``priority``'s queue.

    Works bare (``@priority_task``, level normal) or called (``@priority_task(priority="high")``),
    on a plain function (any other keyword goes to Celery's task decorator) or stacked on an
    existing ``@app.task``. The level is checked here, when the module is imported.

    Raises:
        RoutingError: ``priority`` is not one of the five levels.
        ConfigurationError: a resource option is not a positive number.
    """
    level = parse_level(priority)
    resources = _check_resources(options)

    def decorate(target: Any) -> Any:
        if isinstance(target, PromiseProxy):
            # A task of an app not finalized yet: place it once Celery creates it.
            target.__then__(_place, target, level, resources)
            return target
        if isinstance(target, Task):
            _place(target, level, resources)
            return target
        if not callable(target):
            raise ConfigurationError(
                f"@priority_task decorates a function or a Celery task, not {type(target).__name__}"
            )
        return shared_task(
            base=TaskyardTask, taskyard_level=level,
            **resources, **options,
        )(target)

    if fn is not None:
        return decorate(fn)
    return decorate
