"""Test app for the fast publisher: tasks that record what their message carried.

The same task names are registered on a plain Celery app in :mod:`tests.apps.fastsend_plain`, so
a message sent by taskyard's fast path can be run by either kind of worker.
"""

from __future__ import annotations

from typing import Any

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of
from tests.apps.fastsend_runs import record

app = create_app("fastsend")


@priority_task(priority="normal", name="fastsend.echo", bind=True)
def echo(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
    record(self, "taskyard", args, kwargs, runtime_of(app).redis)
    return [list(args), kwargs]


@priority_task(priority="normal", name="fastsend.spawn", bind=True)
def spawn(self: Any) -> str:
    """Sends ``echo`` from inside a worker: its message names this task as parent."""
    record(self, "taskyard", (), {}, runtime_of(app).redis)
    return str(echo.delay("child").id)
