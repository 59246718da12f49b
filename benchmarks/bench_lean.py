"""The lean execution path against Celery's strategy, paired: both drain at the same time.

On a machine other processes keep busy, rounds run one after the other see different loads, and
the ratio of two such rounds says more about the load than about the code. Here one ``fast``
process on the lean path and one on Celery's strategy (``TASKYARD_LEAN_PATH=false``) drain the
same backlog of no-op tasks at the same time, each from its own Redis database, so both see the
same load; CPU per task is user+sys of each worker's process tree over the window in which both
are draining. Guards are off on both (the same work either way; they would hold a loaded
machine's benchmark back).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import redis

from benchmarks.common import BENCH_REDIS_URL, Result, load_average, warn_if_loaded
from taskyard.testing import ROOT, child_env, spawn, tree_cpu_s, wait_until

APP = "benchmarks.apps.core_taskyard"
#: The two sides and the Redis database of each: the benchmarks' own and the one below it (7
#: by default; the one above, 9, is the test suite's).
_BASE, _, _DB = BENCH_REDIS_URL.rpartition("/")
SIDES = {
    "lean": f"{_BASE}/{int(_DB or 0)}",
    "celery": f"{_BASE}/{(int(_DB or 0) - 1) % 16}",
}
#: Tasks left out at each end of the window: start-up and the first side's last tasks.
MARGIN = 200


def _env(side: str) -> dict[str, str]:
    url = SIDES[side]
    return {
        "TASKYARD_REDIS_URL": url,
        "BENCH_CORE_REDIS_URL": url,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_LEAN_PATH": "true" if side == "lean" else "false",
    }


def _done(client: redis.Redis) -> int:
    return int(client.get("bench:done") or 0)


def paired_round(n: int, log_dir: Path) -> dict[str, float]:
    """One round: rates and CPU per task of both sides, and the load around it."""
    clients = {side: redis.Redis.from_url(url) for side, url in SIDES.items()}
    for side, client in clients.items():
        client.flushdb()
        subprocess.run(
            [sys.executable, "-c", f"from {APP} import noop\nfor _ in range({n}): noop.delay()"],
            env=child_env(_env(side)),
            cwd=ROOT,
            check=True,
            timeout=600,
        )
    load_start = load_average()
    argv = [sys.executable, "-m", "taskyard.cli", "worker", "-A", APP, "--profile", "fast"]
    workers = {
        side: spawn([*argv, "-c", "1"], _env(side), log_dir / f"lean-{side}.log") for side in SIDES
    }
    try:
        wait_until(
            lambda: all(_done(c) >= MARGIN for c in clients.values()), 120, 0.01, "both to start"
        )
        start = {
            side: (tree_cpu_s(workers[side].pid), _done(c), time.perf_counter())
            for side, c in clients.items()
        }
        wait_until(
            lambda: any(_done(c) >= n - MARGIN for c in clients.values()),
            600,
            0.01,
            "the first to near its end",
        )
        out: dict[str, float] = {}
        for side, client in clients.items():
            cpu0, done0, t0 = start[side]
            done = _done(client) - done0
            out[side] = done / (time.perf_counter() - t0)
            out[f"{side}_cpu_us"] = (tree_cpu_s(workers[side].pid) - cpu0) / max(1, done) * 1e6
    finally:
        for process in workers.values():
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in workers.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(30)
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for client in clients.values():
            client.flushdb()
    out["load_start"], out["load_end"] = round(load_start, 2), round(load_average(), 2)
    return out


def run(quick: bool = False) -> list[Result]:
    n = 4_000 if quick else 8_000
    rounds = 1 if quick else 3
    warn_if_loaded("the lean-path benchmark")
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-lean-") as tmp:
        for _ in range(rounds):
            results.append(paired_round(n, Path(tmp)))
            r = results[-1]
            print(
                f"   lean {r['lean']:,.0f}/s {r['lean_cpu_us']:,.0f} µs/task, celery "
                f"{r['celery']:,.0f}/s {r['celery_cpu_us']:,.0f} µs/task "
                f"(load {r['load_start']:.2f} -> {r['load_end']:.2f})",
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for metric, key, higher in (
        ("drain rate, paired", "", True),
        ("worker CPU per task, drain, paired", "_cpu_us", False),
    ):

        def ratio(r: dict[str, float], key: str = key, higher: bool = higher) -> float:
            a, b = r["lean" + key], r["celery" + key]
            return a / b if higher else b / a

        median = sorted(results, key=ratio)[len(results) // 2]
        rows.append(
            Result(
                "lean",
                f"{metric}, fast profile (1 process each), lean path vs Celery's strategy",
                "µs" if key else "tasks/s",
                median["lean" + key],
                median["celery" + key],
                higher_is_better=higher,
                notes=f"N={n} no-op tasks per side, both sides draining at the same time; "
                f"'celery' column is TASKYARD_LEAN_PATH=false; median of {rounds} rounds "
                f"({', '.join(f'{ratio(r):.2f}' for r in results)}); guards off",
                rounds=[{k: round(v, 1) for k, v in r.items()} for r in results],
                load_start=min(r["load_start"] for r in results),
                load_end=max(r["load_end"] for r in results),
            )
        )
    return rows
