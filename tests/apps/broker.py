"""Test app for the broker tests: tasks that count their runs per id and say where they ran."""

from __future__ import annotations

import os
import time

from taskyard import create_app, priority_task
from taskyard.routing import LEVEL_NAMES
from taskyard.runtime import runtime_of
from tests.apps import record_stack_kinds

#: What the stacks task recorded.
STACKS_KEY = "test:stacks"

app = create_app("brokertest")

RUNS_KEY = "test:runs"  # HASH task key -> number of runs
STARTED_KEY = "test:started"  # LIST "key:queue:time" of every start
GATE_KEY = "test:gate"  # while set, hold() sleeps until it is deleted


def _start(key: str, task: object) -> None:
    client = runtime_of(app).redis
    info = getattr(getattr(task, "request", None), "delivery_info", None) or {}
    client.rpush(STARTED_KEY, f"{key}:{info.get('routing_key')}:{time.time():.6f}")
    client.hincrby(RUNS_KEY, key, 1)


def _task(level: str) -> object:
    @priority_task(priority=level, name=f"brokertest.work_{level}", bind=True)
    def work(self: object, key: str, sleep_s: float = 0.0) -> None:
        _start(key, self)
        if sleep_s:
            time.sleep(sleep_s)

    return work


WORK = {level: _task(level) for level in LEVEL_NAMES}


@priority_task(priority="normal", name="brokertest.hold", bind=True)
def hold(self: object, key: str) -> None:
    """Runs once the gate is open (deleted); a way to keep a worker's process busy."""
    _start(key, self)
    client = runtime_of(app).redis
    while client.exists(GATE_KEY):
        time.sleep(0.05)


@priority_task(priority="normal", name="brokertest.pid")
def pid() -> int:
    return os.getpid()


@priority_task(priority="normal", name="brokertest.stacks", bind=True)
def stacks(self: object) -> str:
    return record_stack_kinds(self, runtime_of(app).redis, STACKS_KEY)
