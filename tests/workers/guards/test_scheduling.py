"""Resource guards: CPU pressure handled by scheduling (deferral backoff, counts per reason,
pool priority and autogroup for low and batch workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import Ignore

from taskyard.errors import ConfigurationError
from taskyard.workers.guards import (
    Counters,
    MemoryReadings,
    guard_of,
)
from taskyard.workers.guards.defer import DEFERRED
from tests.workers.guards.fakes import Clock, FakeConsumer, reading, valve_of


def test_deferral_backs_off_exponentially_with_jitter_up_to_the_cap() -> None:
    from taskyard.workers.guards import Deferrer

    top = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0, rand=lambda a, b: b)
    assert [top.countdown(n) for n in (1, 2, 3, 4, 5, 6, 20)] == [3, 6, 12, 24, 48, 60, 60]
    bottom = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0, rand=lambda a, b: a)
    assert [bottom.countdown(n) for n in (1, 2, 3)] == [2, 4, 8]
    real = Deferrer(2.0, 1.0, 600.0, Counters(), 60.0)
    spread = {round(real.countdown(3), 3) for _ in range(50)}
    assert len(spread) > 10 and all(8.0 <= c <= 12.0 for c in spread)


def test_default_backoff_cap_follows_a_short_visibility_timeout(make_app: Any) -> None:
    app = make_app(
        "guardshortvt",
        visibility_timeout_s=3.0,
        reservation_lease_s=0,
        guard={"defer_countdown_s": 0.5, "defer_jitter_s": 0.2},
    )
    guard = guard_of(app)
    assert guard is not None and guard.deferrer.max_countdown_s == pytest.approx(1.35)
    with pytest.raises(ConfigurationError, match="DEFER_MAX_COUNTDOWN_S = 30 s"):
        make_app(
            "guardbadcap",
            visibility_timeout_s=40.0,
            reservation_lease_s=0,
            guard={"defer_max_countdown_s": 30},
        )


def test_requires_memory_deferrals_are_counted_under_their_own_reason(
    make_app: Any, redis_client: redis.Redis
) -> None:
    from taskyard import priority_task

    app = make_app("guardreasons")

    @priority_task(priority="low", requires_memory_mb=4096, name="unit.reasons")
    def needs_much() -> None:
        pass

    task = app.tasks[needs_much.name]
    guard = guard_of(app)
    assert guard is not None
    guard.source = MemoryReadings(reading(memory=10.0, available_mb=100.0))
    for n in range(3):
        task.push_request(id=f"r-{n}", args=[], kwargs={}, delivery_info={"routing_key": "low"})
        try:
            with pytest.raises(Ignore):
                task.before_start(f"r-{n}", [], {})
        finally:
            task.pop_request()
    guard.source.set(memory_pct=95.0, memory_available_mb=9000.0)
    task.push_request(id="r-m", args=[], kwargs={}, delivery_info={"routing_key": "low"})
    try:
        with pytest.raises(Ignore):
            task.before_start("r-m", [], {})
    finally:
        task.pop_request()
    assert guard.counters.by_reason() == {"memory": 1, "requires_memory": 3}
    assert guard.record()["deferred_by_reason"] == {"memory": 1, "requires_memory": 3}
    assert guard.counters.get(DEFERRED) == 4


class FakeWorker:
    def __init__(self, app: Any) -> None:
        self.app = app


@pytest.mark.parametrize(
    ("queues", "nice"),
    [(["low", "batch"], 10), (["batch"], 10), (["normal", "low"], 0), (["critical"], 0)],
)
def test_only_low_and_batch_workers_run_their_pool_at_lower_priority(
    make_app: Any, queues: list[str], nice: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskyard.workers.guards import guard as guard_module

    lowered: list[int] = []
    # The test process's own session must not be slowed down.
    monkeypatch.setattr(guard_module, "lower_autogroup", lowered.append)
    app = make_app(f"guardnice{len(queues)}{nice}")
    app.amqp.queues.select(queues)
    guard = guard_of(app)
    assert guard is not None
    try:
        guard.on_worker_init(FakeWorker(app))
        assert guard.pool_nice == nice
        assert guard.record()["pool_nice"] == nice
        assert lowered == ([nice] if nice else [])
    finally:
        guard.sampler.stop()


def test_autogroup_is_left_alone_when_the_process_does_not_lead_its_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from taskyard.workers.guards import guard as guard_module

    switch = tmp_path / "switch"
    switch.write_text("1\n")
    monkeypatch.setattr(guard_module, "AUTOGROUP_SWITCH", str(switch))
    monkeypatch.setattr(os, "getsid", lambda _pid: os.getpid() + 1)
    assert guard_module.lower_autogroup(10) is False
    switch.write_text("0\n")
    assert guard_module.lower_autogroup(10) is False


def test_quiet_host_holds_nothing_back() -> None:
    clock = Clock()
    valve = valve_of(["critical", "high", "normal", "low", "batch"], clock)
    consumer = FakeConsumer()
    for cpu in (5, 40, 79, 60, 80, 30):  # at the threshold is not above it
        valve.tick(consumer, reading(memory=50, cpu=cpu))
        clock.now += 0.5
    assert consumer.calls == [] and valve.paused == [] and valve.transitions == 0
