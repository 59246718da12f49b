"""Test app: tasks that record the order in which they start."""

from __future__ import annotations

import time

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of
from tests.apps import record_stack_kinds

#: What the stacks task recorded.
STACKS_KEY = "test:stacks"

app = create_app("prio")

ORDER_KEY = "test:order"


def _record(label: str) -> None:
    runtime_of(app).redis.rpush(ORDER_KEY, f"{label}:{time.time():.6f}")


@priority_task(priority="low")
def low_work(i: int, sleep_s: float = 0.005) -> None:
    _record(f"low-{i}")
    time.sleep(sleep_s)


@priority_task(priority="critical")
def critical_work(i: int) -> None:
    _record(f"critical-{i}")


@priority_task(priority="normal")
def slow_work(i: int, sleep_s: float = 3.0) -> None:
    """Marks its start, sleeps, marks its end: a target for SIGKILL tests."""
    _record(f"start-{i}")
    time.sleep(sleep_s)
    _record(f"done-{i}")


@priority_task(priority="critical", name="prio.stacks", bind=True)
def stacks(self: object) -> str:
    return record_stack_kinds(self, runtime_of(app).redis, STACKS_KEY)
