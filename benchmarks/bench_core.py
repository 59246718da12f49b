"""Core platform: no-op throughput and priority isolation, taskyard beside plain Celery.

Each side runs one worker of concurrency 2 (prefork) against the same Redis.
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import redis

from benchmarks.common import BENCH_REDIS_URL, Result, percentile
from taskyard.testing import celery_worker, wait_until

ENV = {"TASKYARD_REDIS_URL": BENCH_REDIS_URL}
SIDES = {"taskyard": ("benchmarks.apps.core_taskyard", "normal"),
         "celery": ("benchmarks.apps.core_plain", "celery")}
ALL = "critical,high,normal,low,batch"


def _module(side: str) -> ModuleType:
    return importlib.import_module(SIDES[side][0])


def _task(side: str, name: str) -> Any:
    """The task object of ``side``'s own app (both apps live in this process)."""
    module = _module(side)
    prefix = "bench.ty." if side == "taskyard" else "bench."
    return module.app.tasks[prefix + name]


def enqueue_rate(side: str, n: int, client: redis.Redis) -> float:
    """Tasks/s that .delay() sends from one process, no worker running."""
    task = _task(side, "noop")
    task.delay()  # connect first
    client.flushdb()
    started = time.perf_counter()
    for _ in range(n):
        task.delay()
    elapsed = time.perf_counter() - started
    client.flushdb()
    return n / elapsed


def end_to_end_rate(side: str, n: int, client: redis.Redis, log_dir: Path) -> float:
    """Tasks/s from the first send until the worker has run all ``n``."""
    app_module, queue = SIDES[side]
    task = _task(side, "noop")
    client.flushdb()
    with celery_worker(app_module, queue, ENV, log_dir, concurrency=2, name=f"tp-{side}"):
        started = time.perf_counter()
        for _ in range(n):
            task.delay()
        wait_until(lambda: int(client.get("bench:done") or 0) >= n, 600, 0.01,
                   f"{side} to run {n} tasks")
        elapsed = time.perf_counter() - started
    client.flushdb()
    return n / elapsed


def critical_waits(side: str, flood: int, criticals: int, client: redis.Redis,
                   log_dir: Path) -> list[float]:
    """Waits (s, sent -> started) of critical tasks sent after a flood of 5 ms low tasks."""
    app_module, queue = SIDES[side]
    low, critical = _task(side, "low"), _task(side, "critical")
    client.flushdb()
    queues = ALL if side == "taskyard" else queue
    with celery_worker(app_module, queues, ENV, log_dir, concurrency=2, name=f"iso-{side}"):
        for _ in range(flood):
            low.delay(0.005)
        for _ in range(criticals):
            critical.delay(time.time())
            time.sleep(0.02)
        wait_until(lambda: client.llen("bench:waits") >= criticals, 900, 0.05,
                   f"{side} critical tasks")
    waits = [float(w) for w in client.lrange("bench:waits", 0, -1)]
    client.flushdb()
    return waits


def _median_round(rates: dict[str, list[float]]) -> tuple[float, float, str]:
    """The round whose taskyard/celery ratio is the median, and every round's ratio."""
    rounds = sorted(zip(rates["taskyard"], rates["celery"], strict=True),
                    key=lambda pair: pair[0] / pair[1])
    ty, pc = rounds[len(rounds) // 2]
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(rates["taskyard"], rates["celery"],
                                                      strict=True))
    return ty, pc, ratios


def run(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 5_000
    flood = 1_000 if quick else 5_000
    criticals = 20 if quick else 50
    rounds = 5
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-core-") as tmp:
        log_dir = Path(tmp)
        # Sides alternate within each round, so the shared machine's load hits both alike; the
        # reported figures are the round with the median ratio.
        enq: dict[str, list[float]] = {side: [] for side in SIDES}
        e2e: dict[str, list[float]] = {side: [] for side in SIDES}
        for _ in range(rounds):
            for side in SIDES:
                enq[side].append(enqueue_rate(side, n, client))
            for side in SIDES:
                e2e[side].append(end_to_end_rate(side, n, client, log_dir))
        ty, pc, ratios = _median_round(enq)
        rows.append(Result("core.throughput", "enqueue rate", "tasks/s", ty, pc, "ratio >= 0.95",
                           notes=f"N={n}, .delay() from one process; median of {rounds} "
                                 f"alternating rounds (ratios {ratios})"))
        ty, pc, ratios = _median_round(e2e)
        rows.append(Result("core.throughput", "end-to-end rate", "tasks/s", ty, pc,
                           "ratio >= 0.95",
                           notes=f"N={n} no-op tasks sent while one worker -c 2 prefork runs "
                                 f"them; median of {rounds} alternating rounds (ratios {ratios})"))
        waits = {side: critical_waits(side, flood, criticals, client, log_dir) for side in SIDES}
    for pct in (50, 99):
        ty, pc = (percentile(waits[s], pct) * 1000 for s in ("taskyard", "celery"))
        rows.append(Result("core.priority_isolation", f"critical wait p{pct}", "ms", ty, pc,
                           "p99 <= 25 ms" if pct == 99 else "", higher_is_better=False,
                           notes=f"{flood} low tasks of 5 ms queued first, then {criticals} "
                                 "critical 20 ms apart; one worker on all queues -c 2; plain "
                                 "Celery default settings (one queue)"))
    ty_p99 = percentile(waits["taskyard"], 99) * 1000
    pc_p50 = statistics.median(waits["celery"]) * 1000
    rows.append(Result("core.priority_isolation", "plain p50 / taskyard p99", "x",
                       pc_p50 / ty_p99, None, ">= 100x"))
    return rows
