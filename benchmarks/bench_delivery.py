"""Delivery: recovery after SIGKILL of a whole worker, and the cost of leases, vs plain Celery.

Recovery: a worker (-c 1, prefetch 100) holds 100 reserved no-op tasks behind one busy task
and is SIGKILLed; a fresh worker with taskyard's defaults starts at once, and the time from the
kill until all 100 have run is measured (the lease, 30 s, plus at most one restore sweep, 10 s,
plus start-up). Plain Celery's figure is its visibility timeout (kombu's default, 3,600 s),
reported as such rather than waited for. Lease cost: no-op drain of one worker -c 2 with leases
and broker-side delays on (defaults) vs off, in alternating rounds.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks import bench_core
from benchmarks.common import Result
from taskyard.testing import celery_worker, wait_until

APP = "benchmarks.apps.delivery_taskyard"
#: kombu's Redis visibility timeout, Celery's default: a dead worker's messages wait this long.
PLAIN_VISIBILITY_TIMEOUT_S = 3600.0
LEASES_OFF = {"TASKYARD_RESERVATION_LEASE_S": "0", "TASKYARD_BROKER_DELAYS": "false"}


def recovery_s(client: redis.Redis, log_dir: Path, reserved: int = 100) -> float:
    """Seconds from SIGKILL of a worker holding ``reserved`` tasks until all of them ran."""
    from benchmarks.apps import delivery_taskyard as app

    client.flushdb()
    client.set("bench:gate", 1)
    # All five queues: a worker consuming critical keeps the prefetch it is given (one on
    # normal alone would reserve taskyard's bulk prefetch, 4 per process, instead).
    with celery_worker(
        APP,
        bench_core.ALL,
        bench_core.ENV,
        log_dir,
        concurrency=1,
        name="doomed",
        extra=("--prefetch-multiplier", str(reserved + 1)),
    ) as doomed:
        app.hold.delay()
        wait_until(lambda: bool(client.exists("bench:holding")), 60, 0.05, "the busy task")
        for _ in range(reserved):
            app.noop.delay()
        wait_until(lambda: client.hlen("unacked") == reserved + 1, 60, 0.05, f"{reserved} reserved")
        doomed.kill(signal.SIGKILL)
        killed = time.monotonic()
    client.delete("bench:gate")
    with celery_worker(APP, bench_core.ALL, bench_core.ENV, log_dir, concurrency=2, name="rescuer"):
        wait_until(
            lambda: int(client.get("bench:done") or 0) >= reserved,
            300,
            0.05,
            "the reserved tasks to run again",
        )
        elapsed = time.monotonic() - killed
    client.flushdb()
    return elapsed


def run(quick: bool = False) -> list[Result]:
    n = 2_000 if quick else 5_000
    rounds = 1 if quick else 3
    client = redis.Redis.from_url(bench_core.REDIS_URL)
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        log_dir = Path(tmp)
        took = recovery_s(client, log_dir)
        rows.append(
            Result(
                "delivery.recovery",
                "SIGKILLed worker holding 100 reserved: all run",
                "s",
                took,
                PLAIN_VISIBILITY_TIMEOUT_S,
                "<= 40 s",
                higher_is_better=False,
                notes="taskyard defaults (lease 30 s, sweep 10 s) including the "
                "rescuing worker's start-up; plain Celery: its visibility "
                "timeout (kombu default), not waited for",
            )
        )
        on: list[float] = []
        off: list[float] = []
        for index in range(rounds):
            pair = [("on", {}), ("off", LEASES_OFF)]
            for label, env in pair if index % 2 == 0 else reversed(pair):
                rate, _ = bench_core.drain("taskyard", n, client, log_dir, env)
                (on if label == "on" else off).append(rate)
                print(f"   leases {label}: {rate:,.0f}/s", file=sys.stderr, flush=True)
    a, b, ratios = bench_core._median_round(on, off)
    rows.append(
        Result(
            "delivery.lease_cost",
            "no-op drain, leases + delays on vs off",
            "tasks/s",
            a,
            b,
            ">= 0.97x",
            notes=f"N={n}, one worker -c 2 prefork; 'celery' column is taskyard with "
            f"TASKYARD_RESERVATION_LEASE_S=0 and TASKYARD_BROKER_DELAYS=false; "
            f"rounds ({ratios})",
        )
    )
    return rows
