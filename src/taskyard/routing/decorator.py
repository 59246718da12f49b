"""``@priority_task``: place a task on one of the five levels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery import Task
from celery.local import PromiseProxy

from taskyard.errors import ConfigurationError
from taskyard.flow.options import take_flow_options
from taskyard.redaction import check_redact
from taskyard.routing.binding import bind_task
from taskyard.routing.jobs import JOB_OPTIONS, check_job_options
from taskyard.routing.levels import Priority, parse_level
from taskyard.routing.options import check_options
from taskyard.runtime import TaskyardApp

F = TypeVar("F", bound=Callable[..., Any])

_RESOURCE_OPTIONS = ("requires_memory_mb", "memory_limit_mb", "cpu_time_limit_s")
#: taskyard's own options of @priority_task (beside Celery's task options).
OWN_OPTIONS = (
    "priority",
    "app",
    "redact",
    "concurrency",
    "partition_by",
    *_RESOURCE_OPTIONS,
    *JOB_OPTIONS,
)
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
    app: TaskyardApp | None = ...,
    requires_memory_mb: float | None = ...,
    memory_limit_mb: float | None = ...,
    cpu_time_limit_s: float | None = ...,
    redact: str | tuple[str, ...] = ...,
    rate_limit: str | int | None = ...,
    concurrency: int | None = ...,
    partition_by: str | Callable[..., Any] | None = ...,
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
    app: TaskyardApp | None = None,
    **options: Any,
) -> Any:
    """Make ``fn`` a Celery task on ``priority``'s queue.

    Works bare (``@priority_task``, level normal) or called (``@priority_task(priority="high")``),
    on a plain function (Celery's task options go to Celery's task decorator) or stacked on an
    existing ``@app.task``. The task belongs to ``app`` when given, else to every taskyard app
    and is used through the current taskyard app (never a plain Celery app). Options are
    checked here, when the module is imported.

    Flow control (docs/flow.md): ``rate_limit="100/s"`` (``/m``, ``/h``) and ``concurrency=5``
    hold cluster-wide, across every worker; ``partition_by`` (an argument name, or a callable
    of the call's arguments returning a string) applies them per value and shares the queue
    fairly between values. ``rate_limit`` here replaces Celery's per-worker token bucket.

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
    if "redact" in options:
        resources["taskyard_redact"] = check_redact(options.pop("redact"))
    # rate_limit= is taskyard's cluster-wide limit here: taken out of Celery's options, so
    # Celery's per-worker token bucket never applies to the task.
    flow_options: dict[str, Any] = {
        name: options.pop(name)
        for name in ("rate_limit", "concurrency", "partition_by")
        if name in options
    }
    take_flow_options("@priority_task", dict(flow_options))  # checked now, at import
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
        # A PromiseProxy is not evaluated here (isinstance on it would create the task).
        fn = None if isinstance(target, PromiseProxy) else getattr(target, "run", target)
        flow = take_flow_options("@priority_task", dict(flow_options), fn)
        if flow is not None:
            resources_and_flow: dict[str, Any] = {**resources, "taskyard_flow": flow}
            if isinstance(target, Task | PromiseProxy):
                resources_and_flow["rate_limit"] = None
        else:
            resources_and_flow = dict(resources)
        if isinstance(target, PromiseProxy):
            # A task of an app not finalized yet: place it once Celery creates it.
            target.__then__(_place, target, level, resources_and_flow)
            return target
        if isinstance(target, Task):
            _place(target, level, resources_and_flow)
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
            **resources_and_flow,
            **options,
        )

    if fn is not None:
        return decorate(fn)
    return decorate
