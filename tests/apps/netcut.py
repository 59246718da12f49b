"""Test app for the network-partition test: tasks that record who ran them, and how often."""

from __future__ import annotations

import time
from typing import Any

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("netcut")

RUNS_KEY = "netcut:runs"  # hash: task number -> completed runs
BY_KEY = "netcut:by:"  # + worker node name: set of task numbers it completed


@priority_task(priority="normal", bind=True)
def unit(self: Any, number: int, sleep_s: float = 0.3) -> None:
    time.sleep(sleep_s)
    redis = runtime_of(app).redis
    redis.hincrby(RUNS_KEY, str(number), 1)
    redis.sadd(BY_KEY + self.request.hostname, number)
