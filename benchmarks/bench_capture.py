"""Capture overhead: no-op task throughput of one worker with metric capture on, off, and plain
Celery, in the same run.

Each variant pre-fills its queue with a start marker, N no-op tasks and an end marker, then
starts one prefork worker (concurrency 1, so the queue drains in order); throughput is N over the
time between the two markers, which excludes worker start-up. Variants are interleaved over
several rounds and each keeps its best round, since the machine is shared and noisy. Capture on
vs off is the figure with the goal (>= 0.97); plain Celery is the reference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

from benchmarks.common import BENCH_REDIS_URL as _DEFAULT_BENCH_REDIS_URL
from benchmarks.common import Result
from taskyard import create_app
from taskyard.testing import ROOT, child_env, wait_until

MARK_PREFIX = "bench:capture:mark:"
#: The benchmarks' Redis database; TASKYARD_BENCH_REDIS_URL moves this benchmark elsewhere when
#: another benchmark is running on the shared one at the same time (both flush it).
BENCH_REDIS_URL = os.environ.get("TASKYARD_BENCH_REDIS_URL", _DEFAULT_BENCH_REDIS_URL)

#: The taskyard app the worker runs (settings from its environment: capture on or off).
ty_app = create_app("bench_capture")
#: Plain Celery with the same delivery settings (late acks, prefetch 1, JSON).
plain_app = Celery("bench_plain", broker=os.environ.get("BENCH_BROKER_URL", BENCH_REDIS_URL))
plain_app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_ignore_result=True,
                      task_serializer="json", accept_content=["json"],
                      worker_hijack_root_logger=False)

_marks: redis.Redis | None = None


def _mark(key: str) -> None:
    global _marks
    if _marks is None:
        _marks = redis.Redis.from_url(os.environ.get("BENCH_BROKER_URL", BENCH_REDIS_URL))
    _marks.set(MARK_PREFIX + key, repr(time.time()))


@ty_app.task(name="bench.capture.noop", shared=False)
def ty_noop() -> None:
    return None


@ty_app.task(name="bench.capture.mark", shared=False)
def ty_mark(key: str) -> None:
    _mark(key)


@plain_app.task(name="bench.plain.noop", shared=False)
def plain_noop() -> None:
    return None


@plain_app.task(name="bench.plain.mark", shared=False)
def plain_mark(key: str) -> None:
    _mark(key)


def _fill(variant: str, n: int) -> None:
    if variant == "plain":
        sender, noop, mark, queue = plain_app, "bench.plain.noop", "bench.plain.mark", "celery"
    else:
        sender = create_app("bench_capture_sender", redis_url=BENCH_REDIS_URL)
        noop, mark, queue = "bench.capture.noop", "bench.capture.mark", "normal"
    with sender.producer_or_acquire() as producer:
        sender.send_task(mark, args=(f"{variant}:start",), queue=queue, producer=producer)
        for _ in range(n):
            sender.send_task(noop, queue=queue, producer=producer)
        sender.send_task(mark, args=(f"{variant}:end",), queue=queue, producer=producer)


def _drain(variant: str, n: int, log_dir: Path, timeout_s: float) -> float:
    """Tasks per second between the start and end markers of one pre-filled queue."""
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.delete(MARK_PREFIX + f"{variant}:start", MARK_PREFIX + f"{variant}:end")
    _fill(variant, n)
    env = {"TASKYARD_REDIS_URL": BENCH_REDIS_URL, "BENCH_BROKER_URL": BENCH_REDIS_URL,
           # Measure capture alone: guards would defer work on this shared, busy machine.
           "TASKYARD_GUARD__ENABLED": "false",
           "TASKYARD_MONITORING__CAPTURE_ENABLED": "false" if variant == "off" else "true"}
    app = "benchmarks.bench_capture:plain_app" if variant == "plain" else \
        "benchmarks.bench_capture:ty_app"
    queue = "celery" if variant == "plain" else "normal"
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue, "-c", "1",
            "-P", "prefork", "-n", f"bench-{variant}@%h", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    log = log_dir / f"capture-{variant}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=child_env(env), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=ROOT)
    try:
        wait_until(lambda: client.exists(MARK_PREFIX + f"{variant}:end") == 1 or
                   proc.poll() is not None, timeout_s, 0.05, f"{variant} queue to drain")
        if proc.poll() is not None:
            raise RuntimeError(f"worker {variant} exited: {log.read_text()[-2000:]}")
        start = float(client.get(MARK_PREFIX + f"{variant}:start") or 0)
        end = float(client.get(MARK_PREFIX + f"{variant}:end") or 0)
        return n / (end - start)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def hook_cost_us(n: int) -> float:
    """In-process cost (microseconds) of the capture receivers for one task: received, prerun
    and postrun, on a fake task and request, net of building the request."""
    from celery.app.task import Context

    from taskyard.monitoring.capture import SENT_HEADER, Capture, _Receivers
    from taskyard.runtime import runtime_of

    app = create_app("bench_capture_hooks", redis_url=BENCH_REDIS_URL)
    capture = Capture(runtime_of(app))
    receivers = _Receivers(app, capture)
    task = type("FakeTask", (), {"app": app, "name": "bench.noop", "queue": "normal"})()
    consumer = type("FakeConsumer", (), {"app": app})()
    request = type("FakeRequest", (), {"name": "bench.noop",
                                       "delivery_info": {"routing_key": "normal"}})()

    def context() -> Context:
        return Context({"delivery_info": {"routing_key": "normal"}, SENT_HEADER: time.time()})

    started = time.perf_counter()
    for _ in range(n):
        task.request = context()
    baseline = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n):
        task.request = context()
        receivers.received(sender=consumer, request=request)
        receivers.prerun(sender=task, task=task)
        receivers.postrun(sender=task, task=task, state="SUCCESS")
    elapsed = time.perf_counter() - started - baseline
    capture.close()
    return elapsed / n * 1e6


def run(quick: bool) -> list[Result]:
    n = 1500 if quick else 4000
    rounds = 1 if quick else 3
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()
    log_dir = Path(tempfile.mkdtemp(prefix="taskyard-bench-capture-"))
    best: dict[str, list[float]] = {"on": [], "off": [], "plain": []}
    for _ in range(rounds):
        for variant in ("off", "on", "plain"):
            best[variant].append(_drain(variant, n, log_dir, timeout_s=120))
            client.flushdb()
    on, off, plain = (max(best[v]) for v in ("on", "off", "plain"))
    cost_us = min(hook_cost_us(20_000 if quick else 100_000) for _ in range(3))
    per_task_us = 1e6 / off
    rounds_note = ", ".join(f"{v}={[round(x) for x in best[v]]}" for v in best)
    return [
        Result("monitoring.capture_overhead", "no-op tasks/s, capture on vs capture off",
               "tasks/s", on, off, goal=">= 0.97",
               notes=f"'celery' column = taskyard with capture OFF; 1 prefork worker -c 1, "
                     f"N={n}, best of {rounds} interleaved rounds ({rounds_note})"),
        Result("monitoring.capture_vs_celery", "no-op tasks/s, capture on vs plain Celery",
               "tasks/s", on, plain,
               notes="reference: plain Celery app, same delivery settings, same run"),
        Result("monitoring.capture_hook_cost", "capture receivers per task (in process)",
               "us", cost_us, goal="<= 3 % of a no-op task",
               higher_is_better=False,
               notes=f"received+prerun+postrun hooks; {100 * cost_us / per_task_us:.2f} % of "
                     f"the {per_task_us:.0f} us a no-op task takes with capture off, i.e. an "
                     f"expected on/off ratio of {per_task_us / (per_task_us + cost_us):.3f}"),
        Result("monitoring.capture_off_vs_celery", "no-op tasks/s, capture off vs plain Celery",
               "tasks/s", off, plain, notes="taskyard without capture (other subsystems on)"),
    ]
