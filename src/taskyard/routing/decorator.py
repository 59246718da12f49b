"""``@priority_task``: place a task on one of the five levels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task
from celery.local import PromiseProxy

from taskyard.errors import ConfigurationError
from taskyard.routing.binding import bind_task
from taskyard.routing.jobs import JOB_OPTIONS, check_job_options
from taskyard.routing.levels import Priority, parse_level
from taskyard.routing.options import check_options

F = TypeVar("F", bound=Callable[..., Any])

_RESOURCE_OPTIONS = ("requires_memory_mb", "memory_limit_mb", "cpu_time_limit_s")
#: taskyard's own options of @priority_task (beside Celery's task options).
OWN_OPTIONS = ("priority", "app", *_RESOURCE_OPTIONS, *JOB_OPTIONS)
_REFUSED = {"base": "taskyard tasks use their app's task class (TaskyardTask)"}


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
    *,
    priority: str | Priority = ...,
    app: Any = ...,
    requires_memory_mb: float | None = ...,
    memory_limit_mb: float | None = ...,
    cpu_time_limit_s: float | None = ...,
    unique: str | None = ...,
    unique_key: Any = ...,
    throttle: float | None = ...,
    debounce: float | None = ...,
    **options: Any,
) -> Callable[[Any], Any]: ...


def priority_task(
    fn: Any = None,
    /,
    *,
    priority: str | Priority = Priority.NORMAL,
    app: Any = None,
    **options: Any,
) -> Any:
    """Make ``fn`` a Celery task on ``priority``'s queue.

    Works bare (``@priority_task``, level normal) or called (``@priority_task(priority="high")``),
    on a plain function (Celery's task options go to Celery's task decorator) or stacked on an
    existing ``@app.task``. The task belongs to ``app`` when given, else to every taskyard app
    and is used through the current taskyard app (never a plain Celery app). Options are
    checked here, when the module is imported.

    Raises:
        RoutingError: ``priority`` is not one of the five levels.
        ConfigurationError: an option is unknown (the message names the closest valid one), a
            resource option is not a positive number, a job option (``unique="queued"|"active"``,
            ``unique_key=`` argument names or a callable, ``throttle=`` s, ``debounce=`` s;
            see docs/jobs.md) is invalid, or ``app`` is not a taskyard app.
    """
    level = parse_level(priority)
    check_options("@priority_task", options, OWN_OPTIONS, _REFUSED)
    job_attributes = check_job_options(options)
    resources: dict[str, Any] = {**_check_resources(options), **job_attributes}
    deliveries = options.get("max_deliveries")
    if deliveries is not None and (
        isinstance(deliveries, bool) or not isinstance(deliveries, int) or deliveries < 1
    ):
        raise ConfigurationError(
            f"max_deliveries={deliveries!r} is not allowed; expected an integer >= 1",
            setting="max_deliveries",
            value=deliveries,
        )

    def decorate(target: Any) -> Any:
        if job_attributes and not isinstance(target, PromiseProxy):
            # Argument names of unique_key= are checked against the function's own.
            check_job_options(
                {"unique": "active", "unique_key": job_attributes["taskyard_unique_key"]},
                target,
            )
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
        return bind_task(
            target,
            app=app,
            decorator="@priority_task",
            taskyard_level=level,
            **resources,
            **options,
        )

    if fn is not None:
        return decorate(fn)
    return decorate
