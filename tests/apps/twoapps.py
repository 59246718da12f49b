"""Test app: a taskyard app, then a plain Celery app created after it in the same module.

The migration case: a team keeps its old Celery app beside the new taskyard one. taskyard's
tasks record the queue they were delivered from.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery

from taskyard import batch_task, create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("twoapps", guard={"enabled": False})

RAN = "test:twoapps:ran"  # LIST of JSON {"task", "queue", "i"}


def _record(task: Any, i: Any) -> None:
    queue = (task.request.delivery_info or {}).get("routing_key")
    runtime_of(app).redis.rpush(RAN, json.dumps({"task": task.name, "queue": queue, "i": i}))


@priority_task(priority="high", name="twoapps.urgent", bind=True)
def urgent(self: Any, i: int) -> None:
    _record(self, i)


@priority_task(priority="low", name="twoapps.report", bind=True)
def report(self: Any, i: int) -> None:
    _record(self, i)


@batch_task(batch_name="twoapps", batch_size=5, max_wait=60, name="twoapps.batch")
def collect(items: list[dict[str, Any]]) -> None:
    runtime_of(app).redis.rpush(
        RAN,
        *[
            json.dumps({"task": "twoapps.batch", "queue": "batch", "i": item["i"]})
            for item in items
        ],
    )


# Created after the taskyard app: Celery makes it the current app of this thread.
plain = Celery("plain", broker=runtime_of(app).settings.effective_redis_url)


@plain.task(name="plain.legacy")
def legacy(i: int) -> None: ...
