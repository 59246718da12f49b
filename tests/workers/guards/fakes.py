"""Stand-ins shared by the guard tests: readings, a settable clock, a consumer recording
pause and resume calls, and what a deferral published."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from taskyard.config import GuardSettings
from taskyard.workers.guards import (
    Reading,
    Valve,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "cgroup"


def reading(memory: float = 10.0, cpu: float = 5.0, available_mb: float = 8000.0) -> Reading:
    return Reading(memory, available_mb, 10000.0, "host", cpu, time.time())


class FakeConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def cancel_task_queue(self, queue: str) -> None:
        self.calls.append(("cancel", queue))

    def add_task_queue(self, queue: str) -> None:
        self.calls.append(("add", queue))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def valve_of(queues: list[str], clock: Clock | None = None, **settings: Any) -> Valve:
    valve = Valve(GuardSettings(**settings), clock or Clock())
    valve.bind(queues)
    return valve


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """Messages published to ``queue``: its list, and (taskyard's Redis transport holds a
    countdown in Redis) its delayed set, whose members are ``"<step>:<message JSON>"``."""
    ready = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    delayed = [
        json.loads(raw.split(b":", 1)[1])
        for raw in client.zrange(f"taskyard:delayed:{queue}", 0, -1)
    ]
    return ready + delayed
