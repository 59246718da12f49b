"""Dead letters: what the gate costs each task, and what recording costs.

* ``deadletters.gate_throughput``: no-op tasks/s of one prefork worker (concurrency 1) draining
  N pre-filled tasks with the dead-letter gate on vs off (the same taskyard app, the gate's
  bootstep discarded on the "off" side). Sides alternate within each round; the round with the
  median ratio is reported, with CPU per task (user+sys of the worker's process tree over the
  drain) beside it. Goal >= 0.97.
* ``deadletters.gate_check_us``: the gate's own cost per first delivery, in process, on real
  kombu messages whose payload is decoded already (Celery's strategy decodes it anyway and kombu
  caches it, so that work is not the gate's). Best of three.
* ``deadletters.timeline_event_us``: the capture's cost per timeline step (in process).
* ``deadletters.redelivery_count_us``, ``record_us``: one redelivered message counted (INCR +
  EXPIRE round trip), one dead letter recorded (the Lua script), against the benchmark Redis.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis

from benchmarks.common import BENCH_REDIS_URL as _DEFAULT
from benchmarks.common import Result
from taskyard.testing import spawn, tree_cpu_s, wait_until, worker_argv

REDIS_URL = os.environ.get("TASKYARD_BENCH_REDIS_URL", _DEFAULT)
APP = "benchmarks.apps.dead_app"


def _drain(side: str, n: int, log_dir: Path) -> tuple[float, float]:
    """(tasks/s, CPU ms per task) of one worker draining ``n`` pre-filled no-op tasks."""
    from benchmarks.apps.dead_app import app, noop

    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*[f"bench:dead:{side}:{k}" for k in ("done", "first", "last")])
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async((side,), producer=producer)
    env = {
        "TASKYARD_REDIS_URL": REDIS_URL,
        "TASKYARD_BENCH_REDIS_URL": REDIS_URL,
        "TASKYARD_GUARD__ENABLED": "false",
        "BENCH_DEAD_GATE": side,
    }
    log = log_dir / f"{side}-{time.monotonic_ns()}.log"
    argv = worker_argv(APP, "normal", concurrency=1, name=f"bench-dead-{side}", loglevel="WARNING")
    process = spawn(argv, env, log)
    try:
        done = f"bench:dead:{side}:done"
        wait_until(lambda: int(client.get(done) or 0) >= 1, 60, 0.005, f"{side} first task")
        cpu0 = tree_cpu_s(process.pid)
        count0 = int(client.get(done) or 0)
        wait_until(lambda: int(client.get(done) or 0) >= n, 300, 0.01, f"{side} drain")
        cpu1 = tree_cpu_s(process.pid)
        first = float(client.get(f"bench:dead:{side}:first") or 0)
        last = float(client.get(f"bench:dead:{side}:last") or 0)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    rate = (n - 1) / max(last - first, 1e-9)
    return rate, 1000 * (cpu1 - cpu0) / max(1, n - count0)


def _messages(n: int, redelivered: bool = False) -> list[Any]:
    from kombu import Connection, Exchange, Queue

    exchange = Exchange("bench", type="direct")
    conn = Connection("memory://")
    channel = conn.channel()
    bound = Queue("normal", exchange, routing_key="normal")(channel)
    bound.declare()
    producer = conn.Producer(channel, exchange=exchange)
    out = []
    for i in range(n):
        producer.publish(
            json.dumps([[i], {}, {}]),
            routing_key="normal",
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "bench.dead.noop", "id": f"bench-{i}"},
        )
        message = bound.get(accept=["json"])
        _ = message.payload  # decoded once, as Celery's strategy does (kombu caches it)
        if redelivered:
            message.delivery_info["redelivered"] = True
        out.append(message)
    return out


def _gate() -> Any:
    from benchmarks.apps.dead_app import app
    from taskyard.deadletters.consumer import Gate

    return Gate(
        SimpleNamespace(
            app=app,
            hostname="bench@h",
            strategies={"bench.dead.noop": object()},
            connection_errors=(),
        )
    )


def gate_check_us(n: int) -> float:
    """The gate's cost per first delivery (µs), best of three."""
    gate = _gate()
    best = float("inf")
    for _ in range(3):
        messages = _messages(n)
        start = time.perf_counter()
        for message in messages:
            gate.check(message, gate.consumer.strategies)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def redelivery_us(n: int) -> float:
    gate = _gate()
    messages = _messages(n, redelivered=True)
    start = time.perf_counter()
    for message in messages:
        gate.count_delivery(message, "bench.dead.noop", message.headers["id"], message.payload)
    elapsed = (time.perf_counter() - start) / n * 1e6
    gate.runtime.redis.delete(*[gate.runtime.keys.deliveries(m.headers["id"]) for m in messages])
    return elapsed


def record_us(n: int) -> float:
    from benchmarks.apps.dead_app import app
    from taskyard.deadletters import DeadLetter, RedisDeadLetterStore
    from taskyard.runtime import runtime_of

    store = RedisDeadLetterStore.for_runtime(runtime_of(app))
    entries = [
        DeadLetter(
            id=f"bench-dead-{i}",
            reason="failed",
            name="bench.dead.noop",
            queue="normal",
            exception_type="ValueError",
            exception="x",
            traceback="Traceback ...\n" * 20,
            args=f"[{i}]",
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    for entry in entries:
        store.record(entry)
    elapsed = (time.perf_counter() - start) / n * 1e6
    store.delete([e.id for e in entries])
    return elapsed


def timeline_event_us(n: int) -> float:
    """The capture's cost per timeline step (µs), no flush: what each task pays up to 4 times."""
    from benchmarks.apps.dead_app import app
    from taskyard.monitoring.capture import capture_of

    capture = capture_of(app)
    assert capture is not None
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            capture.event(
                "0f2a4e6c-7b1d-4c3e-9a8b-5d6e7f809a1b",
                "started",
                "bench.dead.noop",
                "normal",
                "bench@host",
                str(i),
            )
        best = min(best, (time.perf_counter() - start) / n * 1e6)
        capture._take_events()
    return best


def run(quick: bool) -> list[Result]:
    n = 1000 if quick else 3000
    rounds = 2 if quick else 5
    log_dir = Path(tempfile.mkdtemp(prefix="taskyard-bench-dead-"))
    redis.Redis.from_url(REDIS_URL).flushdb()
    per_round = []
    for i in range(rounds):
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        per_round.append({side: _drain(side, n, log_dir) for side in order})
    middle = sorted(per_round, key=lambda r: r["on"][0] / r["off"][0])[len(per_round) // 2]
    (on, on_cpu), (off, off_cpu) = middle["on"], middle["off"]
    ratios = [round(r["on"][0] / r["off"][0], 3) for r in per_round]
    micro_n = 5_000 if quick else 20_000
    return [
        Result(
            "deadletters.gate_throughput",
            "no-op tasks/s, dead-letter gate on vs off",
            "tasks/s",
            on,
            off,
            goal=">= 0.97",
            notes=f"'celery' column = the same taskyard worker with the gate's bootstep "
            f"discarded; 1-process prefork worker draining N={n} pre-filled tasks; "
            f"round with the median ratio of {rounds} {ratios}; CPU per task on "
            f"{on_cpu:.3f} ms vs off {off_cpu:.3f} ms (worker process tree)",
        ),
        Result(
            "deadletters.gate_cpu_per_task",
            "worker CPU per task, gate on vs off",
            "ms",
            on_cpu,
            off_cpu,
            higher_is_better=False,
            notes="user+sys of the worker's process tree over the drain, same round",
        ),
        Result(
            "deadletters.gate_check_us",
            "gate cost per first delivery (in process)",
            "us",
            gate_check_us(micro_n),
            higher_is_better=False,
            notes=f"{micro_n} real kombu messages, payload already decoded; best of 3",
        ),
        Result(
            "deadletters.timeline_event_us",
            "task timeline: one step buffered",
            "us",
            timeline_event_us(micro_n),
            higher_is_better=False,
            notes="capture.event (a deque append of one packed string), best of 3; each "
            "task records received, started and its outcome in the worker",
        ),
        Result(
            "deadletters.redelivery_count_us",
            "counting one redelivered message",
            "us",
            redelivery_us(min(micro_n, 2000)),
            higher_is_better=False,
            notes="INCR + EXPIRE pipeline against the benchmark Redis; redeliveries only",
        ),
        Result(
            "deadletters.record_us",
            "recording one dead letter (Lua, indexes, bounds)",
            "us",
            record_us(min(micro_n, 2000)),
            higher_is_better=False,
            notes="1.2 KB entries into the benchmark Redis",
        ),
    ]
