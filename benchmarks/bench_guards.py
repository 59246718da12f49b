"""Resource guards: cost of one admission check, and no-op throughput with guards on vs off.

1. Admission reads the sampler's last reading (one attribute) and compares it with precomputed
   thresholds; the alternative is a psutil call per task (``virtual_memory()`` +
   ``cpu_percent(None)``). Both timed in this process.
2. A queue pre-filled with no-op tasks is drained by one worker (-c 2 prefork) with the guards on
   (admission + accounting), off, and by plain Celery; the rate is measured between 10 % and 90 %
   done so worker start-up does not count. Thresholds stay unreached (CPU thresholds at 100: the
   benchmark saturates both cores), so this is the cost of the checks, not of deferrals.
"""

from __future__ import annotations

import os
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL, Result
from taskyard import create_app
from taskyard.testing import celery_worker, tree_cpu_s, wait_until

#: The benchmark's Redis database; BENCH_GUARDS_REDIS_URL moves it when several benchmark runs
#: share one Redis (each benchmark flushes its database).
REDIS_URL = os.environ.get("BENCH_GUARDS_REDIS_URL", BENCH_REDIS_URL)
DONE = "bench:guards:done"
_redis = redis.Redis.from_url(REDIS_URL)

taskyard_app = create_app("bench-guards", redis_url=REDIS_URL)
plain_app = Celery("bench-guards-plain", broker=REDIS_URL)


@taskyard_app.task(name="bench.guards.noop", shared=False)
def taskyard_noop() -> None:
    _redis.incr(DONE)


@plain_app.task(name="bench.guards.noop", shared=False)
def plain_noop() -> None:
    _redis.incr(DONE)


BASE_ENV = {
    "TASKYARD_REDIS_URL": REDIS_URL,
    "BENCH_GUARDS_REDIS_URL": REDIS_URL,
    "TASKYARD_GUARD__CPU_WARNING_PCT": "100",
    "TASKYARD_GUARD__CPU_CRITICAL_PCT": "100",
    "TASKYARD_GUARD__CPU_RESUME_PCT": "99",
}
VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "guards on": ("benchmarks.bench_guards:taskyard_app", "normal", {}),
    "guards off": (
        "benchmarks.bench_guards:taskyard_app",
        "normal",
        {"TASKYARD_GUARD__ENABLED": "false", "TASKYARD_GUARD__ACCOUNTING": "false"},
    ),
    "plain celery": ("benchmarks.bench_guards:plain_app", "celery", {}),
}


def _best_us(stmt: Any, number: int, repeat: int = 5) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def admission_costs(quick: bool) -> dict[str, float]:
    """Microseconds per task: admission check, whole guard hook, psutil per task."""
    from taskyard.workers.guards import guard_of

    # CPU thresholds off: this process measures the check, it must not defer.
    app = create_app(
        "bench-guards-admission",
        redis_url=REDIS_URL,
        guard={"cpu_warning_pct": 100, "cpu_critical_pct": 100, "cpu_resume_pct": 99},
    )

    @app.task(name="bench.guarded")
    def guarded() -> None:
        pass

    guard = guard_of(app)
    assert guard is not None
    guard.sampler.sample()
    time.sleep(0.05)
    guard.sampler.sample()
    guard.sampler._thread = object()  # type: ignore[assignment]  # readings stay as sampled
    policy, source = guard.policy, guard.source
    n = 50_000 if quick else 300_000

    def check() -> None:
        policy.check("normal", source.current(), None)

    guarded.push_request(id="x", args=[], kwargs={}, delivery_info={"routing_key": "normal"})
    try:
        admission = _best_us(check, n)

        def hook() -> None:
            guarded.before_start("x", (), {})
            guarded.after_return("SUCCESS", None, "x", (), {}, None)

        hook_us = _best_us(hook, n // 3)
    finally:
        guarded.pop_request()
    psutil.cpu_percent(None)

    def per_task_psutil() -> None:
        psutil.virtual_memory()
        psutil.cpu_percent(None)

    psutil_us = _best_us(per_task_psutil, n // 30)
    return {"admission": admission, "hook": hook_us, "psutil": psutil_us}


def tracer_costs(quick: bool) -> dict[str, float]:
    """Microseconds per no-op task through Celery's own tracer (what a pool child runs per task),
    guards on, admission only, and off; same process, alternating, best of 5."""
    from celery.app.trace import build_tracer

    from taskyard.workers.guards import guard_of

    def traced(name: str, **guard: Any) -> Any:
        app = create_app(
            f"bench-guards-trace-{name}",
            redis_url=REDIS_URL,
            guard={"cpu_warning_pct": 100, "cpu_critical_pct": 100, "cpu_resume_pct": 99, **guard},
        )

        @app.task(name="bench.guards.traced", shared=False)
        def traced_noop() -> None:
            pass

        app.finalize()
        g = guard_of(app)
        assert g is not None
        g.sampler.sample()
        g.sampler._thread = object()  # type: ignore[assignment]  # readings stay as sampled
        if g.meter is not None:
            g.meter.flush_interval_s = 1e9  # measure the run, not Redis
        task = app.tasks["bench.guards.traced"]
        tracer = build_tracer(task.name, task, app=app, eager=False, propagate=False)
        request = {
            "id": "t",
            "hostname": "bench",
            "delivery_info": {"routing_key": "normal", "exchange": "taskyard"},
        }
        return lambda: tracer("t", (), {}, request)

    variants = {
        "on": traced("on"),
        "admission": traced("admission", accounting=False),
        "off": traced("off", enabled=False, accounting=False),
    }
    n = 5_000 if quick else 20_000
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(5):
        for name, call in variants.items():
            best[name] = min(best[name], timeit.timeit(call, number=n) / n * 1e6)
    return best


def drain_rate(variant: str, n: int, client: redis.Redis, log_dir: Path) -> tuple[float, float]:
    """(tasks/s, worker CPU us per task) of one worker draining ``n`` queued no-op tasks,
    measured between 10 % and 90 % done."""
    app_module, queue, extra = VARIANTS[variant]
    client.flushdb()
    # A producer of its own on the benchmark database (the apps read their broker at import).
    producer = Celery("bench-guards-producer", broker=REDIS_URL)
    with producer.producer_or_acquire() as pub:
        for _ in range(n):
            producer.send_task("bench.guards.noop", queue=queue, routing_key=queue, producer=pub)
    producer.close()
    lo, hi = int(n * 0.1), int(n * 0.9)
    with celery_worker(
        app_module,
        queue,
        {**BASE_ENV, **extra},
        log_dir,
        concurrency=2,
        name=f"bg-{variant.replace(' ', '-')}",
    ) as worker:
        wait_until(lambda: int(client.get(DONE) or 0) >= lo, 300, 0.002, "10 %")
        started, cpu0 = time.perf_counter(), tree_cpu_s(worker.pid)
        wait_until(lambda: int(client.get(DONE) or 0) >= hi, 600, 0.002, "90 %")
        elapsed, cpu1 = time.perf_counter() - started, tree_cpu_s(worker.pid)
        wait_until(lambda: int(client.get(DONE) or 0) >= n, 300, 0.01, "all")
    client.flushdb()
    return (hi - lo) / elapsed, (cpu1 - cpu0) / (hi - lo) * 1e6


def run(quick: bool = False) -> list[Result]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    costs = admission_costs(quick)
    rows = [
        Result(
            "guards.admission",
            "admission check",
            "us",
            costs["admission"],
            costs["psutil"],
            "<= 5 us",
            higher_is_better=False,
            notes="taskyard: policy check on the sampler's reading; plain column: a psutil "
            "call per task (virtual_memory + cpu_percent) instead",
        ),
        Result(
            "guards.admission",
            "per-task guard hook",
            "us",
            costs["hook"],
            costs["psutil"],
            "",
            higher_is_better=False,
            notes="before_start + after_return: admission, level lookup, accounting "
            "(statm pread + process_time twice)",
        ),
    ]
    trace = tracer_costs(quick)
    rows.append(
        Result(
            "guards.worker_cost",
            "per-task execution (Celery tracer), guards on vs off",
            "us",
            trace["on"],
            trace["off"],
            "",
            higher_is_better=False,
            notes=f"no-op task through build_tracer in one process; admission only "
            f"(accounting off): {trace['admission']:.1f} us",
        )
    )
    n = 3_000 if quick else 6_000
    reps = 1 if quick else 5
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpus: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-guards-") as tmp:
        # Interleaved and best-of, to damp the shared machine's noise.
        for _ in range(reps):
            for variant in VARIANTS:
                rate, cpu = drain_rate(variant, n, client, Path(tmp))
                rates[variant].append(rate)
                cpus[variant].append(cpu)
    on, off, plain = (max(rates[v]) for v in ("guards on", "guards off", "plain celery"))
    pairs = sorted(a / b for a, b in zip(rates["guards on"], rates["guards off"], strict=True))
    note = (
        f"N={n} queued no-op tasks, one worker -c 2 prefork, best of {reps}; "
        f"median of the on/off ratios of back-to-back runs: {pairs[len(pairs) // 2]:.2f}; "
        f"all runs: "
        + "; ".join(f"{v}: " + ", ".join(f"{r:.0f}" for r in rs) for v, rs in rates.items())
    )
    rows.append(
        Result(
            "guards.throughput",
            "no-op rate, guards on vs off",
            "tasks/s",
            on,
            off,
            "ratio >= 0.97",
            notes=note,
        )
    )
    rows.append(
        Result(
            "guards.throughput",
            "no-op rate, guards on vs plain Celery",
            "tasks/s",
            on,
            plain,
            "",
            notes="plain Celery app with default settings",
        )
    )
    cpu_on, cpu_off, cpu_plain = (min(cpus[v]) for v in ("guards on", "guards off", "plain celery"))
    rows.append(
        Result(
            "guards.throughput",
            "worker CPU per task, guards on vs off",
            "us",
            cpu_on,
            cpu_off,
            "",
            higher_is_better=False,
            notes="CPU time of the worker and its pool between 10 % and 90 % done, "
            f"least of {reps}; plain Celery: {cpu_plain:.0f} us",
        )
    )
    return rows
