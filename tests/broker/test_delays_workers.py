"""Broker-side delays through real `celery worker` processes: memory and reservations stay flat
under 10,000 countdown tasks, starts are on time, restarts duplicate nothing, retries and guard
deferrals wait in Redis, beat moves due messages too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from taskyard.keys import Keys
from taskyard.testing import ROOT, celery_worker, child_env, run_python, terminate, wait_until
from tests.apps import delays as delay_app

pytestmark = pytest.mark.slow

APP = "tests.apps.delays"
KEYS = Keys()
#: kombu's HASH of delivered, unacknowledged messages: what a worker holds.
UNACKED = "unacked"
NO_GUARDS = {"TASKYARD_GUARD__ENABLED": "false"}


def _send(env: dict[str, str], code: str, timeout_s: float = 120) -> None:
    """Send from a separate producer process using the test app's configuration."""
    run_python(env, f"from tests.apps import delays\n{code}", timeout_s)


def _runs(client: redis.Redis, key: str = delay_app.RUNS) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange(key, 0, -1)]


def _stamps_in(client: redis.Redis, queue: str) -> int:
    """``stamp`` messages waiting in ``queue`` (beat sends its own jobs too)."""
    return sum(
        json.loads(raw)["headers"]["task"] == delay_app.stamp.name
        for raw in client.lrange(queue, 0, -1)
    )


def _tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def test_ten_thousand_countdowns_leave_the_worker_flat_and_start_on_time(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    """Outcomes only: none reserved before it is due, each due one run once and never early,
    the rest still waiting in Redis, memory and reservations flat. How late they start is
    printed; speed is measured by benchmarks/bench_delays.py, not asserted here."""
    env = {**redis_env, **NO_GUARDS}
    # 10,000 pending countdown tasks: 9,000 due in an hour (they stay pending through the test)
    # and 1,000 due one after another over spread_s, after a lead counted from when the 9,000
    # are sent (however long a loaded machine takes for them). The sender records the first
    # due time in Redis for this test to read.
    n, far, lead_s, spread_s = 10_000, 9_000, 10.0, 20.0
    soon = n - far
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2) as worker:
        time.sleep(1.0)
        rss_before = _tree_rss_mb(worker.pid)
        _send(
            env,
            f"""
import datetime as dt, time
from taskyard.runtime import runtime_of
def at(due):
    return dt.datetime.fromtimestamp(due, dt.timezone.utc)
for i in range({soon}, {n}):
    delays.stamp.apply_async((i, time.time() + 3600), eta=at(time.time() + 3600))
t0 = time.time() + {lead_s}
for i in range({soon}):
    due = t0 + i * {spread_s / soon}
    delays.stamp.apply_async((i, due), eta=at(due))
runtime_of(delays.app).redis.set("test:t0", repr(t0))
""",
            timeout_s=300,
        )
        t0 = float(redis_client.get("test:t0") or 0)
        assert redis_client.zcard(KEYS.delayed("normal")) >= far
        peak_rss, peak_reserved = rss_before, 0
        while time.time() < t0 - 0.5:
            peak_rss = max(peak_rss, _tree_rss_mb(worker.pid))
            peak_reserved = max(peak_reserved, redis_client.hlen(UNACKED))
            time.sleep(0.2)
        assert peak_reserved == 0, "a worker reserved countdown messages before they were due"

        def all_ran() -> bool:
            nonlocal peak_rss, peak_reserved
            peak_rss = max(peak_rss, _tree_rss_mb(worker.pid))
            # Reservations while they run: bounded by the prefetch (4 per process), not by n.
            peak_reserved = max(peak_reserved, redis_client.hlen(UNACKED))
            return bool(redis_client.llen(delay_app.RUNS) >= soon)

        wait_until(all_ran, spread_s + 120, 0.1, f"the {soon} due tasks to run")
        time.sleep(1.0)  # a duplicate would land now
        runs = _runs(redis_client)
        assert redis_client.zcard(KEYS.delayed("normal")) == far
    counts = Counter(r["i"] for r in runs)
    assert set(counts) == set(range(soon)) and max(counts.values()) == 1
    lateness = sorted(r["at"] - r["due"] for r in runs)
    p50, p99, worst = lateness[soon // 2], lateness[int(soon * 0.99)], lateness[-1]
    print(
        f"lateness p50={p50:.3f}s p99={p99:.3f}s max={worst:.3f}s; "
        f"rss {rss_before:.1f}->{peak_rss:.1f} MB; peak reserved {peak_reserved}"
    )
    assert peak_rss - rss_before < 10, (rss_before, peak_rss)
    assert peak_reserved <= 8
    # Never early: the mover goes by the Redis clock, which is this machine's.
    assert lateness[0] > -0.05


def _stop_warm(worker: Any) -> None:
    """A warm shutdown: SIGTERM to the main process only (the harness's stop signals the whole
    process group, which kills running pool children and redelivers their tasks)."""
    worker.process.terminate()
    worker.process.wait(60)


def _send_spread(env: dict[str, str], n: int, first_due: float, step_s: float) -> None:
    _send(
        env,
        f"""
import datetime as dt
for i in range({n}):
    due = {first_due} + i * {step_s}
    delays.stamp.apply_async((i, due), eta=dt.datetime.fromtimestamp(due, dt.timezone.utc))
""",
    )


def test_a_worker_restart_before_they_are_due_duplicates_none(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**redis_env, **NO_GUARDS}
    n = 2000
    # Due in an hour: still parked whatever the machine's load when the first worker stops.
    _send_spread(env, n, time.time() + 3600, 0.004)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2, name="first") as first:
        time.sleep(2)
        # Plain Celery's worker would hold all 2,000 now and hand them back on the restart.
        assert redis_client.hlen(UNACKED) == 0
        _stop_warm(first)
    assert redis_client.llen(delay_app.RUNS) == 0
    # The hour passes: the parked messages' scores (due time in ms on the Redis clock, this
    # machine's) are brought to now, in their order, as waiting would (keys.py: delayed set).
    key = KEYS.delayed("normal")
    parked = redis_client.zrange(key, 0, -1, withscores=True)
    assert len(parked) == n
    now_ms = time.time() * 1000
    redis_client.zadd(key, {member: now_ms + i for i, (member, _) in enumerate(parked)}, xx=True)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2, name="second"):
        wait_until(
            lambda: redis_client.llen(delay_app.RUNS) >= n, 60, message="every countdown task"
        )
        time.sleep(2)
    counts = Counter(r["i"] for r in _runs(redis_client))
    assert set(counts) == set(range(n))
    assert max(counts.values()) == 1, [i for i, c in counts.items() if c > 1][:10]
    assert redis_client.zcard(KEYS.delayed("normal")) == 0


def test_a_worker_restart_while_they_run_loses_none(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**redis_env, **NO_GUARDS}
    n = 2000
    _send_spread(env, n, time.time() + 4, 0.004)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2, name="first") as first:
        wait_until(
            lambda: redis_client.llen(delay_app.RUNS) >= 300,
            40,
            message="the first countdown tasks to run",
        )
        _stop_warm(first)
    # Stopped mid-run: some still delayed, some in the queue, some were running.
    assert redis_client.llen(delay_app.RUNS) < n
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2, name="second"):
        wait_until(
            lambda: redis_client.llen(delay_app.RUNS) >= n, 60, message="every countdown task"
        )
        time.sleep(2)
    counts = Counter(r["i"] for r in _runs(redis_client))
    assert set(counts) == set(range(n))
    twice = [i for i, c in counts.items() if c > 1]
    # The delayed set moves each message once; what a stop under load can run twice is the
    # handful the worker held (prefetch 8) as the consumer closed, the same with immediate
    # tasks (a transport shutdown matter, not a delay one).
    assert len(twice) <= 8, twice
    assert redis_client.zcard(KEYS.delayed("normal")) == 0


def test_retries_wait_in_the_delayed_set(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**redis_env, **NO_GUARDS}
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2):
        _send(env, "for i in range(5): delays.retry_once.delay(i, 3.0)")
        wait_until(lambda: redis_client.llen(delay_app.RETRIES) >= 5, 20, message="first runs")
        # While the retries wait, the worker holds none of them.
        wait_until(
            lambda: redis_client.zcard(KEYS.delayed("normal")) == 5,
            5,
            message="5 retries in the delayed set",
        )
        assert redis_client.hlen(UNACKED) == 0
        wait_until(lambda: redis_client.llen(delay_app.RETRIES) >= 10, 20, message="retried runs")
    events = [json.loads(x) for x in redis_client.lrange(delay_app.RETRIES, 0, -1)]
    first = {e["i"]: e["at"] for e in events if e["event"] == "retry"}
    done = {e["i"]: e["at"] for e in events if e["event"] == "done"}
    assert set(done) == set(range(5))
    # Never before the 3 s countdown; how late is left to the bounded waits above (a loaded
    # machine starts them late, which is not what this test is about).
    waits = {i: round(at - first[i], 2) for i, at in done.items()}
    print(f"retry waits {waits}")
    assert all(wait >= 3.0 for wait in waits.values()), waits


def test_guard_deferrals_wait_in_the_delayed_set(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    # Every reading counts as memory pressure: normal work is deferred until overdue.
    env = {
        **redis_env,
        "TASKYARD_GUARD__MEMORY_WARNING_PCT": "1",
        "TASKYARD_GUARD__MEMORY_CRITICAL_PCT": "2",
        "TASKYARD_GUARD__RESUME_PCT": "0.5",
        "TASKYARD_GUARD__MAX_DEFER_AGE_S": "4",
    }
    seen_delayed = 0
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2) as worker:
        _send(env, "import time\nfor i in range(3): delays.stamp.delay(i, time.time())")
        deadline = time.monotonic() + 30
        while redis_client.llen(delay_app.RUNS) < 3 and time.monotonic() < deadline:
            seen_delayed = max(seen_delayed, redis_client.zcard(KEYS.delayed("normal")))
            time.sleep(0.05)
        output = worker.output()
    assert redis_client.llen(delay_app.RUNS) == 3, output[-3000:]
    assert "deferred" in output
    assert seen_delayed >= 1, "deferred tasks never waited in the delayed set"


def test_beat_moves_due_messages(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(redis_env)
    _send(
        env,
        "import time\nfor i in range(3): delays.stamp.apply_async((i, time.time() + 2), "
        "countdown=2)",
    )
    assert redis_client.zcard(KEYS.delayed("normal")) == 3
    log = tmp_path / "beat.log"
    with log.open("wb") as sink:
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                APP,
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(tmp_path / "schedule"),
            ],
            env=child_env(env),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        # No worker runs: only beat can move them onto the queue.
        wait_until(
            lambda: _stamps_in(redis_client, "normal") == 3,
            20,
            0.1,
            message=f"beat to move 3 messages:\n{log.read_text()[-2000:]}",
        )
    finally:
        terminate(beat)
    assert redis_client.zcard(KEYS.delayed("normal")) == 0
