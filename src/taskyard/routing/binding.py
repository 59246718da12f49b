"""Tasks of taskyard's decorators: made in every taskyard app, used through the current one.

Celery's ``shared_task`` registers a task in every app and resolves it through Celery's current
app, which is per thread and becomes any app created later, a plain ``Celery()`` included. These
tasks are registered in taskyard apps only and resolve through
:func:`~taskyard.runtime.current_taskyard_app`, or stay with the app given as ``app=``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import _state
from celery.local import Proxy

from taskyard.errors import ConfigurationError
from taskyard.runtime import current_taskyard_app, is_taskyard_app
from taskyard.seams import Seam

# Celery internals used to make a task in every taskyard app (checked by tests/test_seams.py).
SEAMS = (
    Seam("celery.app.base.Celery", "_task_from_fun", params=("fun",)),
    Seam("celery.app.base.Celery", "_finalize_mutex", "instance"),
    Seam("celery._state", "connect_on_app_finalize", params=("callback",)),
    Seam("celery._state", "_get_active_apps"),
)


def _require_taskyard(app: Any, decorator: str) -> None:
    if not is_taskyard_app(app):
        raise ConfigurationError(
            f"{decorator}(app={getattr(app, 'main', app)!r}): the app was not made by "
            "taskyard.create_app",
            setting="app",
            value=app,
        )


def bind_task(fn: Callable[..., Any], *, app: Any = None, decorator: str, **options: Any) -> Any:
    """The Celery task of ``fn`` (``options`` as for ``app.task``) for taskyard apps.

    With ``app``: a task of that app only. Without: a proxy to the task of the current taskyard
    app, created in each taskyard app when it is finalized (or now, if it already is).
    """
    if app is not None:
        _require_taskyard(app, decorator)
        return app.task(shared=False, **options)(fn)

    def create(target: Any) -> Any:
        # Celery internals: _task_from_fun is what app.task calls to make and register the task
        # (returning the registered one when the name exists).
        return target._task_from_fun(fn, **options)

    def on_finalize(target: Any) -> None:
        if is_taskyard_app(target):
            create(target)

    # Celery internals, as shared_task does: finalize callbacks run for every app finalized
    # later; apps finalized already get the task now.
    _state.connect_on_app_finalize(on_finalize)
    for active in _state._get_active_apps():
        if active.finalized and is_taskyard_app(active):
            with active._finalize_mutex:
                create(active)

    name = options.get("name")
    # The task of the app resolved last: every call resolves again (a proxy has no state of its
    # own), and most calls meet the same app as the one before.
    last: list[Any] = [None, None]

    def resolve() -> Any:
        current = current_taskyard_app()
        if last[0] is current:
            return last[1]
        task_name = name or current.gen_task_name(fn.__name__, fn.__module__)
        task = current.tasks.get(task_name)  # finalizes the app, which registers the task
        if task is None:
            task = create(current)
        last[:] = [current, task]
        return task

    return Proxy(resolve)
