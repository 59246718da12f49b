"""Resource guards in real worker processes on real Redis (slow).

A memory hog pushes the worker above a warning threshold set just above the machine's current
memory use: low tasks are deferred, the batch queue is paused, critical tasks keep running; when
the hog lets go, everything completes exactly once. Limits stop tasks and replace the child.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.testing import celery_worker, wait_until
from taskyard.workers.guards import Probe, Sampler

pytestmark = pytest.mark.slow

QUEUES = "critical,high,normal,low,batch"


def _heartbeat(client: redis.Redis, hostname: str) -> dict[str, Any] | None:
    raw = client.get(f"taskyard:worker:{hostname}")
    return json.loads(raw) if raw else None


def _hostname(client: redis.Redis, prefix: str) -> str:
    names = [m.decode() for m in client.zrange("taskyard:workers", 0, -1)]
    return next((n for n in names if n.startswith(prefix)), prefix + "?")


RUNS_KEY = "test:guard:runs"
HOG_KEY = "test:guard:hog"


def _runs(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(r) for r in client.lrange(RUNS_KEY, 0, -1)]


def _hog_events(client: redis.Redis) -> dict[str, float]:
    events = [json.loads(r) for r in client.lrange(HOG_KEY, 0, -1)]
    return {e["event"]: e["at"] for e in events}


class Sender:
    """Sends the test app's tasks by name from a producer app on the suite's Redis."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, task: str, level: str, *args: Any) -> None:
        self.app.send_task(
            f"tests.apps.guard.{task}", args=list(args), queue=level, routing_key=level
        )


def test_memory_hog_defers_low_pauses_batch_and_nothing_is_lost(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path, make_app: Any
) -> None:
    send = Sender(make_app("guardproducer"))

    # The worker's own view (cgroup or host), so the thresholds match what it will read.
    now = Sampler(Probe()).sample()
    total_mb, used_pct = now.memory_total_mb, now.memory_pct
    hog_mb = int(min(2048.0, 0.25 * now.memory_available_mb))
    hog_pct = 100.0 * hog_mb / total_mb
    # Thresholds relative to the machine's current use: the hog crosses the warning threshold,
    # releasing it brings memory back below the resume threshold.
    warning = used_pct + 0.5 * hog_pct
    resume = used_pct + 0.3 * hog_pct
    env = {
        **redis_env,
        "TASKYARD_GUARD__MEMORY_WARNING_PCT": f"{warning:.3f}",
        "TASKYARD_GUARD__MEMORY_CRITICAL_PCT": "99.5",
        "TASKYARD_GUARD__RESUME_PCT": f"{resume:.3f}",
        # CPU is shared with whatever else runs on the machine: out of this test.
        "TASKYARD_GUARD__CPU_WARNING_PCT": "100",
        "TASKYARD_GUARD__CPU_CRITICAL_PCT": "100",
        "TASKYARD_GUARD__CPU_RESUME_PCT": "99",
        "TASKYARD_GUARD__PAUSABLE_LEVELS": '["batch"]',
        "TASKYARD_GUARD__SAMPLE_INTERVAL_S": "0.2",
        "TASKYARD_GUARD__DEFER_COUNTDOWN_S": "0.3",
        "TASKYARD_GUARD__DEFER_JITTER_S": "0.3",
        "TASKYARD_GUARD__MAX_DEFER_AGE_S": "300",
        "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "0.3",
    }
    hostname_prefix = "guardhog@"
    with celery_worker(
        "tests.apps.guard", QUEUES, env, tmp_path, concurrency=3, name="guardhog"
    ) as worker:

        def beat() -> dict[str, Any] | None:
            names = [m.decode() for m in redis_client.zrange("taskyard:workers", 0, -1)]
            mine = [n for n in names if n.startswith(hostname_prefix)]
            return _heartbeat(redis_client, mine[0]) if mine else None

        wait_until(lambda: (beat() or {}).get("state") == "ok", 15, message="heartbeat ok")
        first = beat()
        assert first is not None and first["queues"] == QUEUES.split(",")
        assert first["memory_source"] in ("host", "cgroup") and first["pid"] == worker.pid

        send("hog", "high", hog_mb, 8.0)
        wait_until(lambda: "holding" in _hog_events(redis_client), 20, message="hog holding")
        wait_until(
            lambda: (beat() or {}).get("paused_queues") == ["batch"],
            10,
            message="batch queue paused",
        )
        loaded = beat()
        assert loaded is not None and loaded["state"] == "warning"
        assert loaded["memory_pct"] > warning

        for i in range(20):
            send("record_low", "low", i)
        for i in range(5):
            send("record_batch", "batch", i)
        for i in range(10):
            send("record_critical", "critical", i)

        def labels(prefix: str) -> list[str]:
            return [r["label"] for r in _runs(redis_client) if r["label"].startswith(prefix)]

        wait_until(lambda: len(labels("critical-")) == 10, 15, message="critical tasks")
        assert "released" not in _hog_events(redis_client), "critical work waited for the hog"
        wait_until(lambda: (beat() or {}).get("deferred", 0) >= 1, 10, message="deferrals")

        wait_until(
            lambda: len(labels("low-")) == 20 and len(labels("batch-")) == 5,
            60,
            message="all low and batch tasks",
        )
        released = _hog_events(redis_client)["releasing"]
        runs = _runs(redis_client)
        counts = collections.Counter(r["label"] for r in runs)
        assert all(n == 1 for n in counts.values()), counts
        assert len(counts) == 35
        held = [r for r in runs if r["label"].startswith(("low-", "batch-"))]
        early = [r for r in held if r["at"] <= released]
        assert not early, f"low/batch work ran under pressure: {early}, released at {released}"
        assert all(r["at"] < released for r in runs if r["label"].startswith("critical-"))
        assert max(r["deferrals"] for r in held if r["label"].startswith("low-")) >= 1

        wait_until(lambda: (beat() or {}).get("paused_queues") == [], 10, message="resume")
        final = beat()
        assert final is not None and final["state"] == "ok" and final["overdue"] == 0
        assert final["deferred"] >= 1
        log = worker.output()
        assert "paused queues batch (memory" in log and "resumed queues batch (memory" in log
        # Nothing left behind in the broker.
        time.sleep(0.5)
        assert all(redis_client.llen(q) == 0 for q in QUEUES.split(","))
    resources = redis_client.hgetall("taskyard:resources")
    hog = json.loads(resources[b"tests.apps.guard.hog"])
    assert hog["runs"] == 1 and hog["rss_growth_max_mb"] >= 0.0


def test_limits_stop_tasks_and_replace_the_child(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path, make_app: Any
) -> None:
    send = Sender(make_app("guardproducer"))

    # Admission off: limits, accounting and the heartbeat work without it.
    env = {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_GUARD__SAMPLE_INTERVAL_S": "0.1",
        "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "0.5",
        "TASKYARD_GUARD__ACCOUNTING_FLUSH_INTERVAL_S": "0.1",
    }
    with celery_worker(
        "tests.apps.guard", QUEUES, env, tmp_path, concurrency=1, name="guardlimit"
    ) as worker:
        wait_until(
            lambda: _heartbeat(redis_client, _hostname(redis_client, "guardlimit@")) is not None,
            10,
            message="heartbeat",
        )
        beat = _heartbeat(redis_client, _hostname(redis_client, "guardlimit@"))
        assert beat is not None and beat["guards_enabled"] is False
        assert beat["paused_queues"] == [] and beat["pid"] == worker.pid
        wait_until(lambda: bool(worker.children()), 10, message="pool child")
        first_child = worker.children()
        send("grow_past_limit", "normal", 300)
        wait_until(
            lambda: "TaskMemoryLimitExceeded" in worker.output(), 20, message="memory limit failure"
        )
        wait_until(
            lambda: bool(worker.children()) and worker.children() != first_child,
            20,
            message="child replaced",
        )
        send("spin", "normal", 10.0)
        wait_until(
            lambda: "TaskCpuLimitExceeded" in worker.output(), 20, message="cpu limit failure"
        )
        send("noop", "normal")

        def resources() -> dict[str, Any]:
            return {
                k.decode(): json.loads(v)
                for k, v in redis_client.hgetall("taskyard:resources").items()
            }

        wait_until(
            lambda: resources().get("tests.apps.guard.noop", {}).get("runs") == 1,
            20,
            message="noop after the limits",
        )
        data = resources()
        grow = data["tests.apps.guard.grow_past_limit"]
        assert grow["memory_limit_exceeded"] == 1 and grow["rss_growth_max_mb"] > 100
        spin = data["tests.apps.guard.spin"]
        assert spin["cpu_limit_exceeded"] == 1 and 0.5 < spin["cpu_max_s"] < 5.0
        log = worker.output()
        assert "used 3" in log and "over its limit of 100 MB" in log
        assert "over its limit of 0.50 s" in log
        wait_until(
            lambda: (
                (_heartbeat(redis_client, _hostname(redis_client, "guardlimit@")) or {}).get(
                    "limit_exceeded"
                )
                == 2
            ),
            10,
            message="limits counted",
        )
    # A clean shutdown removes the worker's record.
    assert not redis_client.keys("taskyard:worker:guardlimit@*")
    assert not [
        m for m in redis_client.zrange("taskyard:workers", 0, -1) if m.startswith(b"guardlimit@")
    ]
