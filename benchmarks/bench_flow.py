"""Flow control (docs/flow.md): what limits, fair share and pauses cost and how exact they are.

* Drain of 1 worker -c 2 (prefork) over N no-op tasks with limits configured on an unrelated
  task vs an app without any flow option (alternating rounds): what the fetch pays when a
  queue's tasks are not governed.
* The same with N tasks spread over 1,000 partition values of one task (fair share) vs the
  task without ``partition_by``.
* Rate accuracy: 3 workers -c 2 draining a 20/s task (8 s) and a 500/s task (6 s): starts per
  one-second window (fixed windows after the first start), p50 and max; the limit's burst is
  max(1, rate/10).
* Slot recovery: a worker holding both slots of a concurrency=2 task is SIGKILLed (lease 3 s,
  sweep 1 s); seconds until a second worker starts the next one.
* Pause latency: a worker drains 5 ms tasks of the low queue; the queue is paused (the store's
  call, as `taskyard pause` makes it); seconds from the call to the last start (p99 of rounds).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import redis

from benchmarks import bench_core
from benchmarks.common import Result, percentile
from taskyard.testing import celery_worker, tree_cpu_s, wait_until

APP = "benchmarks.apps.flow_taskyard"
ENV = {**bench_core.ENV, "TASKYARD_GUARD__ENABLED": "false"}
OFF = {"BENCH_FLOW_LIMITS": "off"}


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _app(env: dict[str, str]):  # type: ignore[no-untyped-def]
    """The benchmark app module on the sending side. Sent messages are the same either way (a
    partition header the worker's app does not govern is ignored by the fetch): the worker's
    own environment decides what is configured."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    from benchmarks.apps import flow_taskyard

    return flow_taskyard


def drain(
    client: redis.Redis, log_dir: Path, n: int, env: dict[str, str], partitions: int = 0
) -> tuple[float, float]:
    """(tasks/s, CPU µs per task) of one worker draining ``n`` tasks queued before it starts."""
    client.flushdb()
    app = _app(ENV)
    if partitions:
        for i in range(n):
            app.tenant.delay(f"t{i % partitions}")
    else:
        for _ in range(n):
            app.noop.delay()
    with celery_worker(APP, "normal", {**ENV, **env}, log_dir, concurrency=2, name="drain") as w:
        wait_until(lambda: bool(client.exists("bench:first")), 120, 0.002, "the first task")
        cpu0, done0 = tree_cpu_s(w.pid), int(client.get("bench:done") or 0)
        first = float(client.get("bench:first") or 0)
        wait_until(lambda: int(client.get("bench:done") or 0) >= n, 600, 0.005, "the drain")
        end, cpu1 = time.time(), tree_cpu_s(w.pid)
    client.flushdb()
    return n / (end - first), (cpu1 - cpu0) / max(1, n - done0) * 1e6


def rate_windows(
    client: redis.Redis, log_dir: Path, task: str, rate: int, seconds: int
) -> list[int]:
    """Starts in each whole second after the first start, 3 workers -c 2 draining the task."""
    client.flushdb()
    app = _app(ENV)
    sender = getattr(app, task)
    for _ in range(rate * (seconds + 2)):
        sender.delay()
    with ExitStack() as stack:
        for index in range(3):
            stack.enter_context(
                celery_worker(APP, "normal", ENV, log_dir, concurrency=2, name=f"rate{index}")
            )
        wait_until(lambda: client.llen("bench:starts") > 0, 60, 0.01, "the first start")
        first = float(client.lindex("bench:starts", 0) or 0)
        time.sleep(max(0.0, first + seconds + 0.5 - time.time()))
    starts = [float(t) for t in client.lrange("bench:starts", 0, -1)]
    first = min(starts)
    windows = [0] * seconds
    for t in starts:
        second = int(t - first)
        if second < seconds:
            windows[second] += 1
    client.flushdb()
    return windows


def slot_recovery_s(client: redis.Redis, log_dir: Path) -> float:
    """Seconds from SIGKILL of a worker holding both slots until another worker starts one."""
    client.flushdb()
    env = {**ENV, "TASKYARD_RESERVATION_LEASE_S": "3", "TASKYARD_UNACKED_RESTORE_INTERVAL_S": "1"}
    app = _app(env)
    client.set("bench:gate", 1)
    for _ in range(4):
        app.capped.delay()
    with celery_worker(APP, "normal", env, log_dir, concurrency=2, name="doomed") as doomed:
        wait_until(lambda: client.llen("bench:starts") == 2, 60, 0.01, "both slots held")
        with celery_worker(APP, "normal", env, log_dir, concurrency=2, name="rescuer"):
            time.sleep(1.0)
            doomed.kill(signal.SIGKILL)
            killed = time.time()
            wait_until(lambda: client.llen("bench:starts") >= 3, 120, 0.01, "a slot back")
            back = float(client.lindex("bench:starts", 2) or 0) - killed
            client.delete("bench:gate")
    client.flushdb()
    return back


def pause_latencies(client: redis.Redis, log_dir: Path, rounds: int) -> list[float]:
    """Seconds from a pause of the low queue to the last start on it, one per round."""
    from taskyard.flow import store_of

    client.flushdb()
    app = _app(ENV)
    store = store_of(app.app)
    out: list[float] = []
    with celery_worker(APP, "low", ENV, log_dir, concurrency=2, name="paused"):
        for _ in range(rounds):
            for _ in range(400):
                app.work.delay(0.005)
            wait_until(lambda: client.llen("bench:starts") > 20, 60, 0.01, "the drain")
            paused_at = time.time()
            store.pause(queue="low", key="bench")
            time.sleep(1.5)
            starts = [float(t) for t in client.lrange("bench:starts", 0, -1)]
            out.append(max(0.0, max(starts) - paused_at))
            store.resume(queue="low", key="bench")
            wait_until(lambda: client.llen("low") == 0, 120, 0.05, "the queue to drain")
            time.sleep(0.5)
            client.delete("bench:starts")
    client.flushdb()
    return out


def run(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 5_000
    rounds = 1 if quick else 3
    client = redis.Redis.from_url(bench_core.REDIS_URL)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-flow-") as tmp:
        log_dir = Path(tmp)
        for label, partitions, goal in (
            ("unrelated limits", 0, ">= 0.95x"),
            ("1,000 partitions", 1000, ">= 0.9x"),
        ):
            on: list[float] = []
            off: list[float] = []
            cpu_on: list[float] = []
            cpu_off: list[float] = []
            loads = []
            for index in range(rounds):
                pair = [("on", {}), ("off", OFF)]
                for side, env in pair if index % 2 == 0 else reversed(pair):
                    rate, cpu = drain(client, log_dir, n, env, partitions)
                    (on if side == "on" else off).append(rate)
                    (cpu_on if side == "on" else cpu_off).append(cpu)
                    loads.append(_load())
                    print(
                        f"   {label} {side}: {rate:,.0f}/s, {cpu:,.0f} µs CPU/task", file=sys.stderr
                    )
            a, b, ratios = bench_core._median_round(on, off)
            ca, cb, _ = bench_core._median_round(cpu_on, cpu_off, False)
            rows.append(
                Result(
                    "flow.drain" if not partitions else "flow.fair_share",
                    f"no-op drain, {label} vs none",
                    "tasks/s",
                    a,
                    b,
                    goal,
                    notes=f"N={n}, one worker -c 2 prefork; 'celery' column: the same app without "
                    f"flow options; rounds ({ratios}); CPU/task {ca:,.0f} vs {cb:,.0f} µs; "
                    f"load {', '.join(loads)}",
                )
            )
        for task, rate, seconds in (("rated20", 20, 8), ("rated500", 500, 6)):
            windows = rate_windows(client, log_dir, task, rate, seconds)
            burst = max(1, -(-rate // 10))
            rows.append(
                Result(
                    f"flow.rate_{rate}",
                    f"starts per second at {rate}/s, 3 workers (p50, max in notes)",
                    "starts/s",
                    percentile([float(w) for w in windows], 50),
                    None,
                    f"max <= {rate + burst}",
                    notes=f"max {max(windows)}, windows {windows}, burst {burst}, load {_load()}",
                )
            )
            print(f"   rate {rate}/s: {windows}", file=sys.stderr)
        recovery = slot_recovery_s(client, log_dir)
        rows.append(
            Result(
                "flow.slot_recovery",
                "SIGKILL holding both slots -> next start elsewhere",
                "s",
                recovery,
                None,
                "<= lease + sweep (3 + 1 s)",
                higher_is_better=False,
                notes=f"TASKYARD_RESERVATION_LEASE_S=3, sweep 1 s; load {_load()}",
            )
        )
        latencies = pause_latencies(client, log_dir, 5 if quick else 20)
        rows.append(
            Result(
                "flow.pause_latency",
                "pause -> last start on the queue (p99)",
                "s",
                percentile(latencies, 99),
                None,
                "<= 1 s",
                higher_is_better=False,
                notes=f"{len(latencies)} rounds, 1 worker -c 2 on 5 ms tasks; p50 "
                f"{percentile(latencies, 50):.3f} s; what was already reserved still starts; "
                f"load {_load()}",
            )
        )
    return rows
