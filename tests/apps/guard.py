"""Test app for the resource guards: a memory hog, recording tasks, limit breakers."""

from __future__ import annotations

import json
import time

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("guardtest")

RUNS_KEY = "test:guard:runs"
HOG_KEY = "test:guard:hog"


def _record(label: str, **extra: object) -> None:
    runtime_of(app).redis.rpush(RUNS_KEY, json.dumps({"label": label, "at": time.time(), **extra}))


def _deferrals(task: object) -> int:
    request = task.request  # type: ignore[attr-defined]
    value = getattr(request, "taskyard_deferrals", None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get("taskyard_deferrals")
    return int(value or 0)


@priority_task(priority="high", bind=True)
def hog(self: object, size_mb: int, hold_s: float) -> None:
    """Holds ``size_mb`` of touched memory for ``hold_s`` seconds, then frees it."""
    redis = runtime_of(app).redis
    block = b"\x01" * (size_mb * 1024 * 1024)
    redis.rpush(HOG_KEY, json.dumps({"event": "holding", "at": time.time()}))
    time.sleep(hold_s)
    # Marked before letting go: nothing held back may have started before this instant.
    redis.rpush(HOG_KEY, json.dumps({"event": "releasing", "at": time.time()}))
    del block
    redis.rpush(HOG_KEY, json.dumps({"event": "released", "at": time.time()}))


@priority_task(priority="low", bind=True)
def record_low(self: object, i: int) -> None:
    _record(f"low-{i}", deferrals=_deferrals(self))


@priority_task(priority="batch", bind=True)
def record_batch(self: object, i: int) -> None:
    _record(f"batch-{i}", deferrals=_deferrals(self))


@priority_task(priority="critical", bind=True)
def record_critical(self: object, i: int) -> None:
    _record(f"critical-{i}", deferrals=_deferrals(self))


@priority_task(priority="normal", memory_limit_mb=100)
def grow_past_limit(size_mb: int) -> None:
    """Grows its process by ``size_mb`` and waits: stopped by TaskMemoryLimitExceeded."""
    block = b"\x01" * (size_mb * 1024 * 1024)
    time.sleep(10)
    del block


@priority_task(priority="normal", cpu_time_limit_s=0.5)
def spin(seconds: float) -> None:
    """Burns CPU: stopped by TaskCpuLimitExceeded."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1


@priority_task(priority="normal")
def noop() -> None:
    """Does nothing: accounting and throughput."""


@priority_task(priority="high", bind=True)
def record_high(self: object, i: int) -> None:
    _record(f"high-{i}", deferrals=_deferrals(self))


@priority_task(priority="normal", bind=True)
def record_normal(self: object, i: int) -> None:
    _record(f"normal-{i}", deferrals=_deferrals(self))


@priority_task(priority="batch", bind=True)
def burn(self: object, i: int, seconds: float) -> None:
    """Burns CPU for ``seconds`` of wall time, then records its process's nice value."""
    import os

    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    _record(f"burn-{i}", nice=os.nice(0), pid=os.getpid())


@priority_task(priority="low", requires_memory_mb=10**9)
def needs_a_petabyte() -> None:
    """Never admitted: deferred for requires_memory until overdue."""
