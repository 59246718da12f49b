"""Test app for flow control: tasks that record when they start and finish."""

from __future__ import annotations

import os
import time

from taskyard import create_app, priority_task
from taskyard.runtime import runtime_of

app = create_app("flowtest")

#: LIST "<task>|<key>|<start time>" of every start, and a counter of tasks running now with
#: its highest value (the concurrency test samples it continuously from inside the tasks).
STARTS = "test:starts"
RUNNING = "test:running:{}"
PEAK = "test:peak:{}"
GATE = "test:gate"


def _started(task: str, key: str) -> None:
    client = runtime_of(app).redis
    client.rpush(STARTS, f"{task}|{key}|{time.time():.6f}")


@priority_task(priority="normal", name="flowtest.capped", concurrency=2)
def capped(key: str, sleep_s: float = 0.2) -> None:
    client = runtime_of(app).redis
    now = client.incr(RUNNING.format("capped"))
    _started("capped", key)
    # The highest number seen running at once (sampled by every start).
    client.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end",
        1,
        PEAK.format("capped"),
        now,
    )
    try:
        deadline = time.monotonic() + sleep_s
        while time.monotonic() < deadline or client.exists(GATE):
            time.sleep(0.02)
    finally:
        client.decr(RUNNING.format("capped"))


@priority_task(priority="normal", name="flowtest.rated", rate_limit="20/s")
def rated(key: str) -> None:
    _started("rated", key)


@priority_task(
    priority="normal", name="flowtest.per_customer", rate_limit="5/s", partition_by="customer"
)
def per_customer(customer: str, key: str) -> None:
    _started(f"per_customer:{customer}", key)


@priority_task(priority="normal", name="flowtest.tenant", partition_by="tenant")
def tenant(tenant: str, key: str) -> None:
    _started(f"tenant:{tenant}", key)


@priority_task(priority="normal", name="flowtest.plain")
def plain(key: str) -> None:
    _started("plain", key)


@priority_task(priority="critical", name="flowtest.urgent")
def urgent(key: str) -> None:
    _started("urgent", key)


@priority_task(priority="normal", name="flowtest.pid")
def pid() -> int:
    return os.getpid()
