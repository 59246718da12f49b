"""Resource guards: shared counters across a fork, per-task accounting merged in Redis, the
heartbeat record, publishing failures and limit breaches inside a running task."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from taskyard.workers.guards import (
    Counters,
    MemoryReadings,
    guard_of,
)
from taskyard.workers.guards.accounting import TaskMeter
from taskyard.workers.guards.defer import DEFERRED
from tests.workers.guards.fakes import reading


def test_shared_counters_add_up_across_a_fork() -> None:
    import os

    counters = Counters()
    counters.share()
    counters.add(DEFERRED)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        counters.add(DEFERRED, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert counters.get(DEFERRED) == 6


class _Task:
    def __init__(self, name: str) -> None:
        self.name = name
        self.memory_limit_mb = None
        self.cpu_time_limit_s = None


def test_accounting_merges_runs_atomically_in_redis(redis_client: redis.Redis) -> None:
    from tests import servers

    client = redis.Redis.from_url(servers.REDIS_URL)
    meters = [TaskMeter(lambda: client, "t:resources", flush_interval_s=3600) for _ in range(2)]
    for meter in meters:
        for _ in range(3):
            meter.start(_Task("app.work"), "id")
            block = bytearray(4 * 2**20)
            block[::4096] = b"\x01" * len(block[::4096])
            sum(range(20000))
            meter.stop(failed=False)
            del block
        meter.flush()
    data = json.loads(redis_client.hget("t:resources", "app.work"))
    assert data["runs"] == 6
    assert data["cpu_s"] > 0 and data["cpu_max_s"] <= data["cpu_s"]
    assert data["rss_growth_mb"] >= data["rss_growth_max_mb"] >= 0
    assert data["memory_limit_exceeded"] == 0 and data["updated_at"] > 0


def test_accounting_keeps_aggregates_when_redis_is_down() -> None:
    down = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    meter = TaskMeter(lambda: down, "t:resources", flush_interval_s=3600)
    meter.start(_Task("app.work"), "id")
    meter.stop(failed=False)
    meter.flush()
    assert meter.pending["app.work"].sums["runs"] == 1


def test_heartbeat_record_in_redis(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("guardbeat", guard={"heartbeat_interval_s": 2.0, "heartbeat_slack_s": 3.0})
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=85.0, cpu=12.5))
    guard.queues = ["critical", "low"]
    guard.heartbeat.hostname = "unit@host"
    data = guard.heartbeat.publish()
    stored = json.loads(redis_client.get("taskyard:worker:unit@host"))
    assert stored == data
    for field in (
        "hostname",
        "pid",
        "at",
        "queues",
        "paused_queues",
        "memory_pct",
        "cpu_pct",
        "memory_source",
        "memory_available_mb",
        "state",
        "deferred",
        "overdue",
    ):
        assert field in stored
    assert stored["state"] == "warning" and stored["memory_pct"] == 85.0
    assert stored["queues"] == ["critical", "low"] and stored["paused_queues"] == []
    assert 0 < redis_client.ttl("taskyard:worker:unit@host") <= 5
    assert redis_client.zscore("taskyard:workers", "unit@host") == pytest.approx(stored["at"])
    guard.heartbeat.stop(remove=True)
    assert redis_client.get("taskyard:worker:unit@host") is None
    assert redis_client.zscore("taskyard:workers", "unit@host") is None


def test_deferral_falls_back_to_requeue_when_publishing_fails(
    guarded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.canvas import Signature
    from celery.exceptions import Reject

    from taskyard.errors import BrokerUnavailable

    _, task, guard = guarded

    def fail(self: Any, *args: Any, **kwargs: Any) -> None:
        raise BrokerUnavailable("unit.low", "redis://down", "connection refused")

    monkeypatch.setattr(Signature, "apply_async", fail)
    task.push_request(id="abc-6", args=[1], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        with pytest.raises(Reject) as info:
            task.before_start("abc-6", [1], {})
    finally:
        task.pop_request()
    assert info.value.requeue is True
    assert guard.counters.get(DEFERRED) == 0


@pytest.mark.parametrize("kind", ["cpu", "memory"])
def test_limit_breach_is_raised_inside_the_running_task(kind: str) -> None:
    import signal
    import threading

    from taskyard.errors import TaskCpuLimitExceeded, TaskMemoryLimitExceeded
    from taskyard.workers.guards.accounting import LIMIT_SIGNAL

    meter = TaskMeter(lambda: redis.Redis(port=1), "t:resources", flush_interval_s=3600)
    previous = signal.getsignal(LIMIT_SIGNAL)
    meter.install_enforcement()
    task = _Task("app.greedy")
    expected: type[Exception]
    if kind == "cpu":
        task.cpu_time_limit_s = 0.05  # type: ignore[assignment]
        expected = TaskCpuLimitExceeded
    else:
        task.memory_limit_mb = 50  # type: ignore[assignment]
        expected = TaskMemoryLimitExceeded

    def check_soon() -> None:
        time.sleep(0.3)
        meter.check_limits()

    checker = threading.Thread(target=check_soon)
    try:
        meter.start(task, "id-1")
        with pytest.raises(expected) as info:
            checker.start()
            block = b"\x01" * (120 * 2**20) if kind == "memory" else b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # burn CPU until the sampler thread stops us
                pass
            del block
        meter.stop(failed=True)
    finally:
        checker.join()
        signal.signal(LIMIT_SIGNAL, previous)
    assert isinstance(info.value, TaskCpuLimitExceeded | TaskMemoryLimitExceeded)
    assert info.value.task_name == "app.greedy"
    field = f"{kind}_limit_exceeded"
    assert meter.pending["app.greedy"].sums[field] == 1
    assert meter.retire is True  # the pool child would now be replaced


def test_cpu_pressure_leaves_out_the_workers_own_processes() -> None:
    import time as _time

    from taskyard.workers.guards.readings import Probe

    own, whole = Probe("host", exclude_own_cpu=True), Probe("host", exclude_own_cpu=False)
    before_own, before_whole, before_self = own.measure(), whole.measure(), own.own_cpu_s()
    deadline = _time.process_time() + 0.4
    while _time.process_time() < deadline:  # this process (the "worker") keeps a core busy
        pass
    after_own, after_whole, after_self = own.measure(), whole.measure(), own.own_cpu_s()
    burned = after_self - before_self
    assert burned >= 0.35
    busy_own = after_own.cpu_busy_s - before_own.cpu_busy_s
    busy_whole = after_whole.cpu_busy_s - before_whole.cpu_busy_s
    # The whole-machine figure includes the loop; the worker's view leaves it out.
    assert busy_whole - busy_own >= 0.3


def test_rss_readings_are_shared_within_their_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    from taskyard.workers.guards import accounting

    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(fd)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    rss = accounting._Rss()
    first = rss.recent()
    assert first > 0 and len(reads) == 1
    clock[0] += accounting.RSS_READING_MAX_AGE_S / 2
    assert rss.recent() == first and len(reads) == 1  # within the max age: the same reading
    clock[0] += accounting.RSS_READING_MAX_AGE_S
    rss.recent()
    assert len(reads) == 2  # older: read again
    rss._after_fork()
    rss.recent()
    assert len(reads) == 3  # a forked child never reuses its parent's reading
