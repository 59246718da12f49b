"""Test app for job control: unique, throttled and debounced tasks, cancellation, progress."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("jobstest")

RUNS = "test:jobs:runs"


def _record(event: str, **fields: Any) -> None:
    runtime_of(app).redis.rpush(
        RUNS, json.dumps({"event": event, "at": time.time(), "pid": os.getpid(), **fields})
    )


@priority_task(priority="normal", bind=True, unique="active")
def once(self: Any, key: str, hold_s: float = 1.0) -> None:
    """Unique while queued or running; holds its lock ``hold_s``."""
    _record("once", key=key, id=self.request.id)
    time.sleep(hold_s)


@priority_task(priority="normal", bind=True, unique="queued", unique_key=("key",))
def queued_only(self: Any, key: str, n: int = 0) -> None:
    _record("queued_only", key=key, n=n, id=self.request.id)


@priority_task(priority="normal", bind=True, throttle=2)
def throttled(self: Any, key: str) -> None:
    _record("throttled", key=key, id=self.request.id)


@priority_task(priority="normal", bind=True, debounce=1.5, unique_key=("key",))
def debounced(self: Any, key: str, value: int) -> None:
    _record("debounced", key=key, value=value, id=self.request.id)


@priority_task(priority="normal", bind=True)
def record(self: Any, i: int) -> None:
    _record("record", i=i, id=self.request.id)


@priority_task(priority="normal", bind=True)
def cooperative(self: Any, steps: int, step_s: float = 0.1) -> str:
    """Reports progress each step and stops when cancelled."""
    _record("started", id=self.request.id)
    for i in range(steps):
        if self.cancel_requested():
            _record("stopped", id=self.request.id, at_step=i)
            return "stopped"
        self.progress(i, steps, f"step {i}")
        time.sleep(step_s)
    _record("finished", id=self.request.id)
    return "finished"


@priority_task(priority="normal", bind=True)
def stubborn(self: Any, seconds: float) -> None:
    """Ignores cancellation: only --terminate ends it."""
    _record("started", id=self.request.id, pid=os.getpid())
    time.sleep(seconds)
    _record("finished", id=self.request.id)


@priority_task(priority="normal")
def noop(i: int) -> None:
    """Does nothing (bulk enqueue)."""
