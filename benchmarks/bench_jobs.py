"""Job control: bulk enqueue, the cost of a unique lock at publish, cancel latency, throttle.

* ``delay_many`` against a loop of ``apply_async`` (the fast ``.delay()`` path) of the same task,
  one producer process, in alternating rounds: tasks/s and producer CPU per task.
* ``.delay()`` of a ``unique="active"`` task against the same task without it (distinct
  arguments, so every call publishes and takes a lock): µs per call, alternating rounds.
* Cancel latency: a running task checks ``cancel_requested()`` every 5 ms; the time from the
  cancel record being written to the task seeing it (p50, p99 over the rounds).
* Throttle accuracy: a producer calls a ``throttle=1`` task about 200 times a second for a few
  seconds; the intervals between the calls that published (mean, and the worst deviation from
  the window).

The machine is shared: the load average is reported with each figure.
"""

from __future__ import annotations

import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.common import Result, percentile
from taskyard.testing import celery_worker, wait_until

ENV = {"TASKYARD_GUARD__ENABLED": "false"}


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


def _bulk_round(side: str, n: int, client: redis.Redis) -> tuple[float, float]:
    from benchmarks.apps import jobs_taskyard as bench

    client.flushdb()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if side == "delay_many":
        bench.noop.delay_many((i,) for i in range(n))
    else:
        for i in range(n):
            bench.noop.apply_async((i,))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert client.llen("normal") == n
    return n / elapsed, cpu / n * 1e6


def _unique_round(side: str, n: int, client: redis.Redis) -> float:
    from benchmarks.apps import jobs_taskyard as bench

    client.flushdb()
    task = bench.unique_noop if side == "unique" else bench.noop
    t0 = time.perf_counter()
    for i in range(n):
        task.delay(i)
    elapsed = time.perf_counter() - t0
    assert client.llen("normal") == n
    return elapsed / n * 1e6


def _ratio_rounds(values: dict[str, list[float]], a: str, b: str, higher: bool) -> str:
    pairs = zip(values[a], values[b], strict=True)
    return ", ".join(f"{(x / y if higher else y / x):.2f}" for x, y in pairs)


def _cancel_latencies(rounds: int, client: redis.Redis, log_dir: Path) -> list[float]:
    from benchmarks.apps import jobs_taskyard as bench
    from taskyard.broker.control.service import control_of
    from taskyard.runtime import runtime_of

    client.flushdb()
    env = {**ENV, "TASKYARD_REDIS_URL": bench.REDIS_URL, "BENCH_JOBS_REDIS_URL": bench.REDIS_URL}
    control = control_of(bench.app, runtime_of(bench.app))
    latencies: list[float] = []
    with celery_worker("benchmarks.apps.jobs_taskyard", "normal", env, log_dir, concurrency=1):
        for _ in range(rounds):
            client.delete("bench:jobs:started")
            task_id = bench.watch.delay(30.0).id
            wanted = task_id.encode()
            wait_until(
                functools.partial(_started_is, client, wanted),
                60,
                0.01,
                "start",
            )
            time.sleep(0.05)
            at = time.time()
            control.cancel([task_id], by="bench")
            wait_until(lambda: client.llen(bench.SEEN) > len(latencies), 30, 0.005, "the cancel")
            seen = float(client.lindex(bench.SEEN, -1).decode().split()[1])  # type: ignore[union-attr]
            latencies.append(seen - at)
    return latencies


def _throttle_intervals(duration_s: float, client: redis.Redis) -> list[float]:
    from benchmarks.apps import jobs_taskyard as bench

    client.flushdb()
    accepted: list[float] = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        result = bench.throttled.delay("k")
        if not result.deduplicated:
            accepted.append(time.monotonic())
        time.sleep(0.005)
    return [b - a for a, b in itertools.pairwise(accepted)]


def run(quick: bool = False) -> list[Result]:
    from benchmarks.apps import jobs_taskyard as bench

    client = redis.Redis.from_url(bench.REDIS_URL)
    rounds = 3 if quick else 5
    n_bulk = 20_000 if quick else 100_000
    n_loop = 2_000 if quick else 10_000
    n_unique = 1_000 if quick else 5_000
    rows: list[Result] = []

    bulk: dict[str, list[tuple[float, float]]] = {"delay_many": [], "apply_async": []}
    loads = []
    for index in range(rounds):
        # Alternating sides: the shared machine's load weighs on both alike.
        for side in (
            ["delay_many", "apply_async"] if index % 2 == 0 else ["apply_async", "delay_many"]
        ):
            n = n_bulk if side == "delay_many" else n_loop
            bulk[side].append(_bulk_round(side, n, client))
            print(f"   {side}: {bulk[side][-1][0]:,.0f}/s", file=sys.stderr, flush=True)
        loads.append(_load())
    rates = {side: [r for r, _ in values] for side, values in bulk.items()}
    cpus = {side: [c for _, c in values] for side, values in bulk.items()}
    rows.append(
        Result(
            "jobs.bulk",
            "enqueue rate, delay_many vs apply_async loop",
            "tasks/s",
            statistics.median(rates["delay_many"]),
            statistics.median(rates["apply_async"]),
            goal=">= 50,000/s, >= 15x",
            notes=f"median of {rounds} alternating rounds ({n_bulk:,} vs {n_loop:,} tasks); "
            f"round ratios {_ratio_rounds(rates, 'delay_many', 'apply_async', True)}; "
            f"{loads[-1]}",
        )
    )
    rows.append(
        Result(
            "jobs.bulk",
            "producer CPU per task, delay_many vs apply_async loop",
            "µs",
            statistics.median(cpus["delay_many"]),
            statistics.median(cpus["apply_async"]),
            higher_is_better=False,
            notes=f"median of {rounds} rounds; {loads[-1]}",
        )
    )

    cost: dict[str, list[float]] = {"unique": [], "plain": []}
    for index in range(rounds):
        for side in ["unique", "plain"] if index % 2 == 0 else ["plain", "unique"]:
            cost[side].append(_unique_round(side, n_unique, client))
            print(f"   {side}: {cost[side][-1]:,.0f} µs/call", file=sys.stderr, flush=True)
    rows.append(
        Result(
            "jobs.unique",
            '.delay() cost, unique="active" vs without',
            "µs/call",
            statistics.median(cost["unique"]),
            statistics.median(cost["plain"]),
            goal="<= 1.3x the plain cost",
            higher_is_better=False,
            notes=f"median of {rounds} alternating rounds of {n_unique:,} calls; round ratios "
            f"(plain/unique) {_ratio_rounds(cost, 'unique', 'plain', False)}; {_load()}",
        )
    )

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        latencies = _cancel_latencies(10 if quick else 40, client, Path(tmp))
    rows.append(
        Result(
            "jobs.cancel",
            "cancel to a running task seeing it, p99",
            "ms",
            percentile(latencies, 99) * 1000,
            higher_is_better=False,
            notes=f"p50 {percentile(latencies, 50) * 1000:.0f} ms over {len(latencies)} cancels "
            f"(cancel_requested() caches 0.1 s; the task checks every 5 ms); {_load()}",
        )
    )

    intervals = _throttle_intervals(4.0 if quick else 10.0, client)
    worst = max((abs(i - 1.0) for i in intervals), default=float("nan"))
    rows.append(
        Result(
            "jobs.throttle",
            "interval between accepted calls, throttle=1 s",
            "s",
            statistics.mean(intervals) if intervals else float("nan"),
            higher_is_better=False,
            notes=f"{len(intervals) + 1} accepted of ~200 calls/s; worst deviation from 1 s "
            f"{worst * 1000:.0f} ms (the producer polls every 5 ms); {_load()}",
        )
    )
    client.flushdb()
    return rows


def _started_is(client: redis.Redis, wanted: bytes) -> bool:
    return client.get("bench:jobs:started") == wanted
