"""Wire the resource guards into an app: the guard object, the task hooks, the consumer
bootstep, signals.

The guard is the app's ``runtime.guard``. It reaches the app's tasks through the app's own task
class (``app.Task``, which every task of the app made by ``@priority_task`` or ``@app.task``
derives from): its ``before_start`` admits or defers the delivery, its ``after_return`` ends the
accounting. Celery's tracer calls both inside its traced block, where an ``Ignore`` marks the
delivery ignored; a signal receiver could not do that (Celery logs and swallows its errors).

Does no I/O: the sampler, heartbeat and enforcement start only inside a worker.
"""

from __future__ import annotations

import weakref
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from taskyard.runtime import Runtime, is_taskyard_app, runtime_of
from taskyard.seams import Seam
from taskyard.workers.guards.backpressure import GuardStep
from taskyard.workers.guards.guard import Guard

# Celery internals (checked by tests/test_seams.py): the tracer calls these hooks only when a
# class below celery.Task defines them.
SEAMS = (
    Seam("celery.app.trace", "task_has_custom", params=("task", "attr")),
    Seam("celery.app.task.Task", "before_start", params=("task_id", "args", "kwargs")),
    Seam(
        "celery.app.task.Task",
        "after_return",
        params=("status", "retval", "task_id", "args", "kwargs", "einfo"),
    ),
)


def guard_of(app: Any) -> Guard | None:
    """The guard installed on ``app``, if any."""
    if not is_taskyard_app(app):
        return None
    guard = runtime_of(app).guard
    return guard if isinstance(guard, Guard) else None


def _hook_tasks(app: Celery, guard: Guard) -> None:
    """Give the app's task class the guard's admission and accounting."""
    if not (guard.enabled or guard.meter is not None):
        return  # nothing to do per task: Celery's tracer then skips both hooks entirely
    before_task, after_task = guard.before_task, guard.after_task

    def before_start(self: Any, task_id: str, args: Any, kwargs: Any) -> None:
        before_task(self, task_id, args, kwargs)

    def after_return(
        self: Any, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        after_task(self, status)

    # Celery internals: the tracer calls before_start/after_return only when a class below
    # celery.Task defines them (celery.app.trace.task_has_custom), looked up when it builds a
    # task's tracer; app.Task is this app's own subclass of its task_cls.
    task_cls = app.Task
    task_cls.before_start = before_start
    task_cls.after_return = after_return


def install(app: Celery, runtime: Runtime) -> Guard:
    """Make a :class:`Guard` the app's guard and connect it to its tasks and worker life cycle."""
    guard = Guard(runtime)
    runtime.guard = guard
    _hook_tasks(app, guard)
    app.steps["consumer"].add(GuardStep)
    app_ref = weakref.ref(app)
    guard_ref = weakref.ref(guard)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        g = guard_ref()
        if g is not None and getattr(sender, "app", None) is app_ref():
            g.on_worker_init(sender)

    def on_process_init(**_: Any) -> None:
        g = guard_ref()
        if g is not None:
            g.on_process_init()

    def on_process_shutdown(**_: Any) -> None:
        g = guard_ref()
        if g is not None and g.in_worker:
            g.on_process_shutdown()

    # Strong references to the closures; each holds only weak references to app and guard.
    guard._receivers = (on_worker_init, on_process_init, on_process_shutdown)  # type: ignore[attr-defined]
    worker_init.connect(on_worker_init, weak=True)
    worker_process_init.connect(on_process_init, weak=True)
    worker_process_shutdown.connect(on_process_shutdown, weak=True)
    return guard
