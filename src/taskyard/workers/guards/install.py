"""Wire the resource guards into an app: the guard object, the consumer bootstep, signals.

Does no I/O: the sampler, heartbeat and enforcement start only inside a worker.
"""

from __future__ import annotations

import weakref
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from taskyard.runtime import Runtime
from taskyard.workers.guards.backpressure import GuardStep
from taskyard.workers.guards.guard import Guard

ATTRIBUTE = "_taskyard_guard"


def guard_of(app: Any) -> Guard | None:
    """The guard installed on ``app``, if any."""
    guard = getattr(app, ATTRIBUTE, None)
    return guard if isinstance(guard, Guard) else None


def install(app: Celery, runtime: Runtime) -> Guard:
    """Attach a :class:`Guard` to ``app`` and connect it to the worker's life cycle."""
    guard = Guard(runtime)
    setattr(app, ATTRIBUTE, guard)
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
