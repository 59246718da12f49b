"""Test app: one task per level, for Flower, the stats API and the dashboard."""

from __future__ import annotations

import time

from taskyard import create_app, priority_task

app = create_app("fivelevels")


@priority_task(priority="critical")
def on_critical(i: int) -> int:
    return i


@priority_task(priority="high")
def on_high(i: int) -> int:
    return i


@priority_task(priority="normal")
def on_normal(i: int, sleep_s: float = 0.0) -> int:
    time.sleep(sleep_s)
    return i


@priority_task(priority="low")
def on_low(i: int) -> int:
    return i


@priority_task(priority="batch")
def on_batch(i: int) -> int:
    return i


@priority_task(priority="normal")
def fails(i: int) -> int:
    raise ValueError(f"task {i} fails on purpose")


#: Task per level, in level order.
BY_LEVEL = {
    "critical": on_critical,
    "high": on_high,
    "normal": on_normal,
    "low": on_low,
    "batch": on_batch,
}
