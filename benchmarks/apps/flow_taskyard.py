"""Benchmark app for flow control. ``BENCH_FLOW_LIMITS=off`` declares the same tasks without
any flow option (the baseline side of each ratio)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from benchmarks.common import BENCH_REDIS_URL
from taskyard import create_app, priority_task

REDIS_URL = os.environ.get("BENCH_CORE_REDIS_URL", BENCH_REDIS_URL)
LIMITS = os.environ.get("BENCH_FLOW_LIMITS", "on") == "on"
app = create_app("bench-flow", redis_url=REDIS_URL)
_redis = redis.Redis.from_url(REDIS_URL)


def _done() -> None:
    if _redis.incr("bench:done") == 1:
        _redis.set("bench:first", repr(time.time()))


def _flow(**options: Any) -> dict[str, Any]:
    return options if LIMITS else {}


@priority_task(priority="normal", name="bench.fl.noop")
def noop() -> None:
    _done()


@priority_task(priority="normal", name="bench.fl.limited", **_flow(rate_limit="5/s", concurrency=1))
def limited() -> None:
    """The unrelated limited task: configured, never sent in the drain benchmark."""
    _done()


@priority_task(priority="normal", name="bench.fl.tenant", **_flow(partition_by="tenant"))
def tenant(tenant: str) -> None:
    _done()


@priority_task(priority="normal", name="bench.fl.rated20", **_flow(rate_limit="20/s"))
def rated20() -> None:
    _redis.rpush("bench:starts", repr(time.time()))


@priority_task(priority="normal", name="bench.fl.rated500", **_flow(rate_limit="500/s"))
def rated500() -> None:
    _redis.rpush("bench:starts", repr(time.time()))


@priority_task(priority="normal", name="bench.fl.capped", **_flow(concurrency=2))
def capped() -> None:
    _redis.rpush("bench:starts", repr(time.time()))
    while _redis.exists("bench:gate"):
        time.sleep(0.01)


@priority_task(priority="low", name="bench.fl.work")
def work(sleep_s: float) -> None:
    _redis.rpush("bench:starts", repr(time.time()))
    time.sleep(sleep_s)
