"""Test app: tasks that crash their process, fail, or record that they ran."""

from __future__ import annotations

import os
from typing import Any

from taskyard import batch_task, create_app, priority_task
from taskyard.runtime import runtime_of

# Resource guards off: on a busy test machine they would hold tasks back and blur the timings.
SETTINGS: dict[str, Any] = {
    "guard": {"enabled": False},
    "batch": {"lease_s": 2.0, "reaper_interval_s": 0.2},
}

app = create_app("deadtest", include=["tests.apps.dead"], **SETTINGS)

RAN = "test:dead:ran"  # LIST: one entry per run, "<label>"


def _ran(label: str) -> int:
    return int(runtime_of(app).redis.rpush(RAN, label))


@priority_task(priority="normal", max_deliveries=2)
def crash(label: str) -> None:
    """Kills its own process (as a segfault or the OOM killer would)."""
    _ran(f"crash-{label}")
    os._exit(13)


@priority_task(priority="normal")
def ok(label: str) -> None:
    _ran(f"ok-{label}")


@priority_task(priority="normal")
def boom(label: str, size: int = 10) -> None:
    """Always fails, with a long argument to show the size cap."""
    _ran(f"boom-{label}")
    raise ValueError(f"boom {label}")


@priority_task(priority="normal", bind=True, max_retries=2, default_retry_delay=0.1)
def flaky(self: Any, label: str) -> None:
    """Fails every attempt, retrying twice, then for good."""
    _ran(f"flaky-{label}")
    try:
        raise KeyError(label)
    except KeyError as exc:
        raise self.retry(exc=exc) from exc


@batch_task(batch_name="crashy", batch_size=3, max_wait=0.3, max_deliveries=2)
def crashy(items: list[dict[str, Any]]) -> None:
    """A batch holding an item {"crash": true} kills its process; the others record items."""
    if any(item.get("crash") for item in items):
        _ran("crashy-crash")
        os._exit(13)
    for item in items:
        _ran(f"crashy-{item['i']}")


if not os.environ.get("DEAD_TEST_BEFORE_DEPLOY"):
    # Absent from a worker started with DEAD_TEST_BEFORE_DEPLOY=1: a task not deployed yet.
    @priority_task(priority="normal", name="tests.apps.dead.late")
    def late(label: str) -> None:
        _ran(f"late-{label}")
