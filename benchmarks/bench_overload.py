"""Overload on a shared host: the demo stack beside a program that keeps both cores busy.

1. **Soak**: ``taskyard up -A <app> --producer examples.bdc.demo`` (the ``make run`` stack: the
   critical, default and batch workers, beat, Flower, the stats API, the demo producer at
   20 messages/s) while two busy-loop processes (another program, as a loaded web server would
   be) keep both cores busy. Two sides, alternating, on a private Redis flushed between runs:

   * ``now``: taskyard as it is;
   * ``landed``: the overload handling that landed before (``benchmarks/apps/overload_landed``:
     CPU above a level's threshold re-publishes its tasks, low/batch paused for CPU with no
     release, no pool nice, 2-3 s fixed deferral countdown, the reaper through beat every
     second, alerts firing and resolving on every collection).

   Over the measured window (after a warm-up): deferrals per execution (re-published / run),
   p95 queue wait per level, the oldest unflushed batch item (sampled every 0.5 s; the flush
   lag bound), the other program's share of the two cores, the stack's CPU per execution
   (user+sys of its whole process tree), reaper tasks sent, and alert state changes.

2. **Critical wait behind a flood while another program burns both cores**: 1,000-5,000 low
   tasks of 5 ms queued, then critical tasks 20 ms apart, one worker on all queues ``-c 2``,
   two busy loops running, taskyard beside plain Celery (bench_core's apps and worker), p99;
   the worker has run a first task before the flood, so its start-up is not counted.

Full runs take 10 minutes per soak side (goal figures of the issue); ``--quick`` 70 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis

from benchmarks.common import Result, percentile
from taskyard.devstack.supervisor import free_port
from taskyard.testing import ROOT, busy_loops, child_env, cpu_seconds, tree_cpu_s, wait_until

LEVELS = ("critical", "high", "normal", "low", "batch")
APPS = {"now": "examples.bdc", "landed": "benchmarks.apps.overload_landed"}
#: Settings that make the current code behave as the landed design did (see the module doc).
LANDED_ENV = {
    "TASKYARD_GUARD__POOL_NICE": "0",
    "TASKYARD_GUARD__CPU_CRITICAL_PAUSE_LEVELS": "[]",
    "TASKYARD_GUARD__CPU_MAX_HOLD_S": "1000000",
    "TASKYARD_GUARD__DEFER_MAX_COUNTDOWN_S": "3",
    # Every second, beat's floor (the landed entry asked for reaper_interval_s, 0.5 s).
    "TASKYARD_SCHEDULE__INTERVALS_S": json.dumps({"taskyard.batching.reap": 1.0}),
    "TASKYARD_MONITORING__ALERT_TIMING": "{}",
}
BATCH_MAX_WAIT_S = 2.0  # examples.bdc's send_notification_batch


class PrivateRedis:
    """A redis-server of the benchmark's own on a free port (flushed freely, never shared)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (scripts/ensure-services.sh)")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, 0.05, "the benchmark's Redis")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _reader(url: str) -> Any:
    from taskyard import create_app
    from taskyard.runtime import runtime_of

    return runtime_of(create_app(f"overload-reader-{time.monotonic_ns()}", redis_url=url))


def _snapshot(runtime: Any) -> dict[str, Any]:
    """Cumulative counters and wait histograms per queue, from the capture's Redis records."""
    from taskyard.monitoring.store import StatsStore

    store = StatsStore(runtime)
    tasks, hists = store.tasks_and_histograms()
    counts: dict[str, dict[str, int]] = {}
    for row in tasks:
        mine = counts.setdefault(str(row["queue"]), {})
        for key in ("succeeded", "failed", "deferred"):
            mine[key] = mine.get(key, 0) + int(row[key])
        if row["name"] == "taskyard.batching.reap":
            mine["reaps"] = mine.get("reaps", 0) + int(row["succeeded"])
    waits: dict[str, list[int]] = {}
    for entry in hists["wait"]:
        merged = waits.setdefault(str(entry["queue"]), [0] * len(entry["counts"]))
        waits[str(entry["queue"])] = [a + b for a, b in zip(merged, entry["counts"], strict=True)]
    return {"counts": counts, "waits": waits, "buckets": hists.get("buckets")}


def soak(side: str, seconds: float, warmup_s: float, log_dir: Path) -> dict[str, Any]:
    """One soak run of ``side``; returns its figures."""
    from taskyard.batching.inspect import inspect_batches
    from taskyard.monitoring.alerts import AlertBook
    from taskyard.monitoring.store import quantile

    workdir = Path(tempfile.mkdtemp(prefix=f"overload-{side}-", dir=log_dir))
    server = PrivateRedis(workdir)
    runtime = _reader(server.url)
    env = {
        "TASKYARD_REDIS_URL": server.url,
        "PYTHONPATH": str(ROOT),
        "TASKYARD_DATABASE_URL": f"sqlite:///{workdir / 'bdc.db'}",
        "TASKYARD_MONITORING__FLOWER_PORT": str(free_port()),
        "TASKYARD_MONITORING__API_PORT": str(free_port()),
    }
    if side == "landed":
        env.update(LANDED_ENV)
    log = workdir / "stack.log"
    with busy_loops(2) as loops, log.open("wb") as sink:
        stack = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskyard.cli",
                "up",
                "-A",
                APPS[side],
                "--producer",
                "examples.bdc.demo",
            ],
            env=child_env(env),
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: stack.poll() is not None or len(_workers(runtime)) >= 3,
                120,
                0.5,
                f"{side}: the stack's three workers",
            )
            if stack.poll() is not None:
                raise AssertionError(f"{side} stack exited:\n{log.read_text()[-3000:]}")
            time.sleep(warmup_s)
            before = _snapshot(runtime)
            loops0, stack0, t0 = cpu_seconds(loops), tree_cpu_s(stack.pid), time.time()
            oldest = 0.0
            while time.time() - t0 < seconds:
                for batch in inspect_batches(runtime):
                    age = batch.get("oldest_age_s")
                    if age is not None:
                        oldest = max(oldest, float(age))
                time.sleep(0.5)
            after = _snapshot(runtime)
            loops1, stack1, t1 = cpu_seconds(loops), tree_cpu_s(stack.pid), time.time()
            changes = [
                c
                for c in AlertBook(runtime.redis, runtime.keys).history(10_000)
                if t0 <= float(c.get("at") or 0.0) <= t1
            ]
            workers = _workers(runtime)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(stack.pid, signal.SIGINT)
            try:
                stack.wait(60)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(stack.pid, signal.SIGKILL)
                stack.wait()
    server.stop()

    def delta(queue: str, key: str) -> int:
        return after["counts"].get(queue, {}).get(key, 0) - before["counts"].get(queue, {}).get(
            key, 0
        )

    runs = sum(delta(q, "succeeded") + delta(q, "failed") for q in LEVELS)
    deferred = sum(delta(q, "deferred") for q in LEVELS)
    p95: dict[str, float | None] = {}
    for queue in LEVELS:
        now_counts = after["waits"].get(queue)
        if now_counts is None:
            p95[queue] = None
            continue
        was = before["waits"].get(queue, [0] * len(now_counts))
        window = [max(0, a - b) for a, b in zip(now_counts, was, strict=True)]
        p95[queue] = quantile(window, 0.95) if sum(window) else None
    wall = t1 - t0
    return {
        "side": side,
        "window_s": wall,
        "runs": runs,
        "deferred": deferred,
        "deferrals_per_run": deferred / runs if runs else float("nan"),
        "wait_p95_s": p95,
        "oldest_batch_item_s": oldest,
        "other_cpu_share": (loops1 - loops0) / (wall * len(os.sched_getaffinity(0))),
        # The machine is shared with more than the stack: the other program against the stack.
        "other_vs_stack": (loops1 - loops0) / max(1e-9, (loops1 - loops0) + (stack1 - stack0)),
        "stack_cpu_per_run_ms": (stack1 - stack0) / runs * 1000 if runs else float("nan"),
        "reaps": delta("high", "reaps"),
        "high_runs": delta("high", "succeeded"),
        "alert_changes": len(changes),
        "alert_changes_by_rule": _count(f"{c.get('alertname')}:{c.get('state')}" for c in changes),
        "paused": {
            w["hostname"]: w.get("paused_reasons") or w.get("paused_queues") for w in workers
        },
    }


def _count(names: Iterator[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _workers(runtime: Any) -> list[dict[str, Any]]:
    from taskyard.monitoring.store import StatsStore

    try:
        return [w for w in StatsStore(runtime).workers() if w.get("alive")]
    except redis.RedisError:
        return []


def critical_under_load(side: str, flood: int, criticals: int, log_dir: Path) -> list[float]:
    """Waits (s, sent -> started) of critical tasks sent after a flood of 5 ms low tasks, with
    two busy loops running; bench_core's apps and worker (one worker, all queues, -c 2).

    The worker has run one critical task before the flood is sent, so its start-up (seconds on a
    loaded machine) is not counted as waiting.
    """
    from benchmarks import bench_core

    client = redis.Redis.from_url(bench_core.REDIS_URL)
    critical = bench_core._task(side, "critical")
    client.flushdb()
    with busy_loops(2):
        worker = bench_core.Worker(side, log_dir)
        try:
            critical.delay(time.time())

            def started() -> bool:
                worker.check()
                return bool(client.llen("bench:waits") >= 1)

            wait_until(started, 120, 0.05, f"{side}: the worker's first task")
            client.delete("bench:waits")
            time.sleep(2.0)  # the guards' CPU window sees the other program
            bench_core.flood_then_criticals(side, worker, flood, criticals, client)
        finally:
            worker.stop()
    waits = [float(w) for w in client.lrange("bench:waits", 0, -1)]
    client.flushdb()
    return waits


def run(quick: bool = False) -> list[Result]:
    seconds = 40.0 if quick else 600.0
    warmup_s = 30.0 if quick else 60.0
    rounds = 1
    flood, criticals = (1_000, 30) if quick else (5_000, 100)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        log_dir = Path(tmp)
        results: dict[str, list[dict[str, Any]]] = {"now": [], "landed": []}
        for index in range(rounds):
            order = ["now", "landed"] if index % 2 == 0 else ["landed", "now"]
            for side in order:
                figures = soak(side, seconds, warmup_s, log_dir)
                results[side].append(figures)
                print(
                    f"   soak {side}: {json.dumps(figures, default=str)}",
                    file=sys.stderr,
                    flush=True,
                )
        waits = {
            side: critical_under_load(side, flood, criticals, log_dir)
            for side in ("taskyard", "celery")
        }
    now, landed = results["now"][0], results["landed"][0]
    note = (
        f"{now['window_s']:.0f} s window after {warmup_s:.0f} s warm-up; the make-run stack "
        f"(demo producer 20/s) beside two busy loops on {len(os.sched_getaffinity(0))} "
        "cores; 'celery' column is the landed design, alternating"
    )
    rows.append(
        Result(
            "overload.soak",
            "deferrals per execution",
            "%",
            100 * now["deferrals_per_run"],
            100 * landed["deferrals_per_run"],
            "< 2 %",
            higher_is_better=False,
            notes=f"{note}; runs {now['runs']} vs {landed['runs']}, deferred "
            f"{now['deferred']} vs {landed['deferred']}",
        )
    )
    for queue in LEVELS:
        a, b = now["wait_p95_s"][queue], landed["wait_p95_s"][queue]
        if a is None:
            continue
        rows.append(
            Result(
                "overload.soak",
                f"{queue} wait p95",
                "s",
                a,
                b,
                "<= 5 s" if queue == "normal" else "",
                higher_is_better=False,
                notes=note,
            )
        )
    rows.append(
        Result(
            "overload.soak",
            "oldest unflushed batch item",
            "s",
            now["oldest_batch_item_s"],
            landed["oldest_batch_item_s"],
            f"<= max_wait + 5 = {BATCH_MAX_WAIT_S + 5:g} s",
            higher_is_better=False,
            notes=f"{note}; sampled every 0.5 s",
        )
    )
    rows.append(
        Result(
            "overload.soak",
            "other program's share of the CPU",
            "%",
            100 * now["other_cpu_share"],
            100 * landed["other_cpu_share"],
            "most of it",
            notes=f"{note}; busy loops' user+sys / (wall x cores)",
        )
    )
    rows.append(
        Result(
            "overload.soak",
            "other program's CPU / (its + the stack's)",
            "%",
            100 * now["other_vs_stack"],
            100 * landed["other_vs_stack"],
            "most of it",
            notes=f"{note}; what the stack left the other program",
        )
    )
    rows.append(
        Result(
            "overload.soak",
            "stack CPU per execution",
            "ms",
            now["stack_cpu_per_run_ms"],
            landed["stack_cpu_per_run_ms"],
            higher_is_better=False,
            notes=f"{note}; user+sys of the whole stack's process tree / runs",
        )
    )
    rows.append(
        Result(
            "overload.soak",
            "reaper tasks on the high queue",
            "tasks",
            float(now["reaps"]),
            float(landed["reaps"]),
            higher_is_better=False,
            notes=f"{note}; high runs {now['high_runs']} vs {landed['high_runs']}",
        )
    )
    rows.append(
        Result(
            "overload.soak",
            "alert state changes",
            "changes",
            float(now["alert_changes"]),
            float(landed["alert_changes"]),
            higher_is_better=False,
            notes=note,
        )
    )
    for pct in (50, 99):
        ty, pc = (percentile(waits[s], pct) * 1000 for s in ("taskyard", "celery"))
        rows.append(
            Result(
                "overload.critical",
                f"critical wait p{pct}, both cores busy",
                "ms",
                ty,
                pc,
                "p99 <= 25 ms" if pct == 99 else "",
                higher_is_better=False,
                notes=f"{flood} low tasks of 5 ms queued, then {criticals} critical "
                "20 ms apart; one worker on all queues -c 2; two busy loops "
                "running; plain Celery default settings (one queue)",
            )
        )
    return rows
