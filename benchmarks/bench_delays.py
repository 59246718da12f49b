"""Broker-side delays: a worker's memory and reservations while countdown tasks wait, and how
late each starts, taskyard beside plain Celery.

Both sides run ``celery worker -c 2`` (prefork) on the same Redis: plain Celery with its defaults
(the worker reserves every countdown message at once and holds it until due), taskyard with its
defaults (the messages wait in Redis, the worker's mover puts each on its queue when due). Each
round sends N tasks whose ETAs start ``lead`` seconds after the send began and follow each other
over ``spread`` seconds (a due rate the worker keeps up with, so lateness measures the delay
path, not a backlog). While they wait, the worker's process-tree RSS and the reserved count
(kombu's ``unacked`` HASH) are sampled; lateness is start minus ETA as the task sees it. The
sides alternate; the figures are the medians over the rounds.
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks.common import BENCH_REDIS_URL, Result, percentile
from taskyard.testing import celery_worker, wait_until

REDIS_URL = os.environ.get("BENCH_DELAYS_REDIS_URL", BENCH_REDIS_URL)
ENV = {
    "TASKYARD_REDIS_URL": REDIS_URL,
    "BENCH_DELAYS_REDIS_URL": REDIS_URL,
    "TASKYARD_GUARD__ENABLED": "false",
}
SIDES = {
    "taskyard": ("benchmarks.apps.delays_taskyard", "normal"),
    "celery": ("benchmarks.apps.delays_plain", "celery"),
}
LATE = "bench:delays:late"


def _tree_rss_mb(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def _task(side: str) -> Any:
    import importlib

    return importlib.import_module(SIDES[side][0]).stamp


def one_round(
    side: str, n: int, lead_s: float, spread_s: float, client: redis.Redis, log_dir: Path
) -> dict[str, float]:
    """Send n countdown tasks to a running worker of ``side``; measure it while they wait."""
    client.flushdb()
    module, queue = SIDES[side]
    task = _task(side)
    with celery_worker(module, queue, ENV, log_dir, concurrency=2, name=f"bd-{side}") as worker:
        time.sleep(1.0)
        rss_before = _tree_rss_mb(worker.pid)
        t0 = time.time() + lead_s
        step = spread_s / n
        for i in range(n):
            due = t0 + i * step
            task.apply_async((due,), eta=dt.datetime.fromtimestamp(due, dt.UTC))
        sent_in = time.time() - (t0 - lead_s)
        peak_rss, peak_reserved = rss_before, 0
        while time.time() < t0 - 0.5:
            peak_rss = max(peak_rss, _tree_rss_mb(worker.pid))
            peak_reserved = max(peak_reserved, int(client.hlen("unacked")))
            time.sleep(0.25)
        wait_until(
            lambda: client.llen(LATE) >= n,
            spread_s + 120,
            0.5,
            message=f"{n} countdown tasks of {side}",
        )
        late = sorted(float(x) for x in client.lrange(LATE, 0, -1))
    client.flushdb()
    return {
        "rss_growth_mb": peak_rss - rss_before,
        "rss_before_mb": rss_before,
        "reserved": float(peak_reserved),
        "late_p50_ms": percentile(late, 50) * 1000,
        "late_p99_ms": percentile(late, 99) * 1000,
        "late_max_ms": late[-1] * 1000,
        "sent_in_s": sent_in,
        "early": float(sum(1 for x in late if x < -0.05)),
    }


def drain_rate(delays_on: bool, n: int, client: redis.Redis, log_dir: Path) -> float:
    """No-op tasks/s of a taskyard worker draining a backlog, its mover on or off."""
    client.flushdb()
    import importlib

    noop = importlib.import_module(SIDES["taskyard"][0]).noop
    with importlib.import_module(SIDES["taskyard"][0]).app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
    env = {**ENV, "TASKYARD_BROKER_DELAYS": "true" if delays_on else "false"}
    with celery_worker(
        SIDES["taskyard"][0], "normal", env, log_dir, concurrency=2, name=f"bd-drain-{delays_on}"
    ):
        wait_until(
            lambda: int(client.get("bench:delays:done") or 0) >= n,
            600,
            0.1,
            message=f"{n} no-op tasks",
        )
        time.sleep(0.2)
        first = float(client.get("bench:delays:first") or 0)
        last = float(client.get("bench:delays:last") or 0)
    client.flushdb()
    return (n - 1) / max(1e-6, last - first)


def run(quick: bool) -> list[Result]:
    n, lead_s, spread_s, rounds = (2000, 30.0, 10.0, 1) if quick else (10_000, 60.0, 40.0, 2)
    client = redis.Redis.from_url(REDIS_URL)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-delays-"))
    got: dict[str, list[dict[str, float]]] = {"taskyard": [], "celery": []}
    for round_no in range(rounds):
        order = ("taskyard", "celery") if round_no % 2 == 0 else ("celery", "taskyard")
        for side in order:
            got[side].append(one_round(side, n, lead_s, spread_s, client, log_dir))

    drain_n = 2000 if quick else 10_000
    drains: dict[bool, list[float]] = {True: [], False: []}
    for round_no in range(3):
        for on in (True, False) if round_no % 2 == 0 else (False, True):
            drains[on].append(drain_rate(on, drain_n, client, log_dir))

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in got[side])

    setup = (
        f"{n} tasks, ETAs {lead_s:g}-{lead_s + spread_s:g} s after sending began, "
        f"worker -c 2 prefork, {rounds} alternating round(s), medians"
    )
    sent = ", ".join(f"{side} sent in {med(side, 'sent_in_s'):.1f} s" for side in got)
    return [
        Result(
            "delays.memory",
            f"worker RSS growth, {n} pending countdown tasks",
            "MB",
            med("taskyard", "rss_growth_mb"),
            med("celery", "rss_growth_mb"),
            goal="flat (< 10 MB)",
            higher_is_better=False,
            notes=f"{setup}; RSS before: taskyard {med('taskyard', 'rss_before_mb'):.0f} MB, "
            f"celery {med('celery', 'rss_before_mb'):.0f} MB",
        ),
        Result(
            "delays.reserved",
            f"messages the worker reserved, {n} pending",
            "messages",
            med("taskyard", "reserved"),
            med("celery", "reserved"),
            goal="flat (0)",
            higher_is_better=False,
            notes="kombu's unacked HASH, peak while they wait",
        ),
        Result(
            "delays.lateness",
            "start minus ETA, p50",
            "ms",
            med("taskyard", "late_p50_ms"),
            med("celery", "late_p50_ms"),
            goal="< 1000 ms",
            higher_is_better=False,
            notes=sent,
        ),
        Result(
            "delays.lateness",
            "start minus ETA, p99",
            "ms",
            med("taskyard", "late_p99_ms"),
            med("celery", "late_p99_ms"),
            goal="< 1000 ms",
            higher_is_better=False,
            notes=f"max: taskyard {med('taskyard', 'late_max_ms'):.0f} ms, celery "
            f"{med('celery', 'late_max_ms'):.0f} ms; started early (> 50 ms before "
            f"the ETA): taskyard {med('taskyard', 'early'):.0f}, celery "
            f"{med('celery', 'early'):.0f}",
        ),
        Result(
            "delays.overhead",
            "no-op drain, mover on vs off (TASKYARD_BROKER_DELAYS)",
            "tasks/s",
            statistics.median(drains[True]),
            statistics.median(drains[False]),
            goal=">= 0.97x",
            notes=f"{drain_n} queued no-op tasks, taskyard worker -c 2, "
            "3 alternating rounds, medians; the 'celery' column is taskyard with the mover "
            f"off; rounds on {[round(x) for x in drains[True]]}, off "
            f"{[round(x) for x in drains[False]]}",
        ),
    ]
