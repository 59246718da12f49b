"""The keyword options of taskyard's decorators: their own, plus Celery's task options."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from celery import Celery
from celery.app import task as celery_task

from taskyard.errors import ConfigurationError, did_you_mean
from taskyard.routing.task import TaskyardTask
from taskyard.seams import Seam

# Celery internals read for the names of a task's sending options (checked by
# tests/test_seams.py; the value read by tests/test_strict.py).
SEAMS = (Seam("celery.app.task", "extract_exec_options"),)

#: Options of Celery's ``app.task`` decorator itself, taken before ``_task_from_fun`` sees the
#: rest (``inner_create_task_cls`` in celery/app/base.py: a nested function, not inspectable).
_DECORATOR_OPTIONS = ("shared", "filter", "lazy")
#: Options ``add_autoretry_behaviour`` reads from the decorator's options (celery/app/autoretry.py).
_AUTORETRY_OPTIONS = (
    "autoretry_for",
    "dont_autoretry_for",
    "retry_kwargs",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
)
#: Public attributes of ``Task`` that are state or plumbing, never decorator options.
_NOT_OPTIONS = frozenset({"request", "request_stack", "from_config", "app"})


def _exec_options() -> tuple[str, ...]:
    # Celery internals: extract_exec_options is mattrgetter(*names), a lambda over the tuple of
    # attribute names a task's class may carry as sending defaults (queue, routing_key, ...).
    for cell in celery_task.extract_exec_options.__closure__ or ():
        if isinstance(cell.cell_contents, tuple):
            return tuple(cell.cell_contents)
    return ()


def _is_routine(cls: type, name: str) -> bool:
    value = inspect.getattr_static(cls, name)
    return (
        isinstance(value, classmethod | staticmethod)
        or inspect.isfunction(value)
        or inspect.isclass(value)
    )


@cache
def celery_task_options() -> frozenset[str]:
    """Every keyword Celery's task decorator accepts, derived from Celery itself.

    ``_task_from_fun``'s parameters (name, base, bind, pydantic...), every public attribute of
    the task class (``_task_from_fun`` sets any other keyword as a class attribute: max_retries,
    rate_limit, acks_late, ignore_result...), the sending defaults and autoretry options.
    """
    params = inspect.signature(Celery._task_from_fun).parameters
    names = {
        name
        for name, param in params.items()
        if name not in ("self", "fun") and param.kind is not param.VAR_KEYWORD
    }
    names.update(
        name
        for name in dir(TaskyardTask)
        if not name.startswith("_") and not _is_routine(TaskyardTask, name)
    )
    names.update(_DECORATOR_OPTIONS, _AUTORETRY_OPTIONS, _exec_options())
    return frozenset(names - _NOT_OPTIONS)


def check_options(
    decorator: str,
    options: Mapping[str, Any],
    own: Iterable[str],
    refused: Mapping[str, str] | None = None,
) -> None:
    """Refuse an option that is neither one of ``own`` nor a Celery task option.

    Raises:
        ConfigurationError: names the option, the closest valid one, and what is allowed.
    """
    own = tuple(own)
    refused = refused or {}
    allowed = celery_task_options() | set(own)
    for name, value in options.items():
        if name in refused:
            raise ConfigurationError(
                f"{decorator}: {name}= is not allowed here; {refused[name]}",
                setting=name,
                value=value,
            )
        if name not in allowed:
            raise ConfigurationError(
                f"{decorator} got an unknown option {name}={value!r}"
                f"{did_you_mean(name, allowed - set(refused))}; it takes {', '.join(own)} and "
                "Celery's task options (name, bind, max_retries, autoretry_for, rate_limit, "
                "time_limit, acks_late, ignore_result, ...)",
                setting=name,
                value=value,
            )
