"""Single-flight claims and the aligned beat schedule (real Redis)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from taskyard import beat as schedule
from taskyard.batching import REAP_TASK
from taskyard.beat import (
    aligned_every,
    beat_entries,
    claim_period,
    period_index,
    single_flight,
)
from taskyard.cache import CACHE_WARM_TASK
from taskyard.maintenance import MAINTENANCE_TASK
from taskyard.monitoring.collect import TASK_NAME as STATS_COLLECT_TASK
from taskyard.runtime import runtime_of


def test_period_index_rounds_to_nearest_boundary() -> None:
    assert period_index(10, 100.0) == 10
    assert period_index(10, 104.9) == 10
    assert period_index(10, 105.1) == 11
    assert period_index(10, 99.0) == 10
    with pytest.raises(ValueError):
        period_index(0, 1.0)


def test_claim_period_once_per_period(make_app: Any) -> None:
    runtime = runtime_of(make_app())
    assert claim_period(runtime, "job", 10, now=100.0)
    assert not claim_period(runtime, "job", 10, now=101.0)
    assert not claim_period(runtime, "job", 10, now=104.0)
    assert claim_period(runtime, "job", 10, now=110.5)
    assert claim_period(runtime, "other", 10, now=101.0)
    ttl = runtime.redis.pttl(runtime.keys.period_claim("job", 10))
    assert 0 < ttl <= 20_000


def test_claim_period_concurrent_threads_one_winner(make_app: Any) -> None:
    runtime = runtime_of(make_app())
    wins: list[bool] = []
    barrier = threading.Barrier(16)

    def contend() -> None:
        barrier.wait()
        wins.append(claim_period(runtime, "race", 60, now=6000.0))

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(wins) == [False] * 15 + [True]


def test_single_flight_lock_skips_overlapping_run(make_app: Any) -> None:
    runtime = runtime_of(make_app())
    with single_flight(runtime, "long", 10, lock_ttl_s=30, now=100.0) as first:
        assert first.acquired and first.reason == "claimed"
        # The next period starts while the first run is still going: it must not overlap.
        with single_flight(runtime, "long", 10, lock_ttl_s=30, now=110.0) as second:
            assert not second.acquired and second.reason == "still-running"
            assert second.report()["skipped"] is True
    assert not runtime.redis.exists(runtime.keys.lock("long"))
    with single_flight(runtime, "long", 10, lock_ttl_s=30, now=120.0) as third:
        assert third.acquired
    with single_flight(runtime, "long", 10, now=121.0) as again:
        assert not again.acquired and again.reason == "period-taken"


def test_aligned_every_fires_at_boundaries() -> None:
    clock = {"now": datetime.fromtimestamp(1000.2, UTC)}
    every = aligned_every(10, nowfun=lambda: clock["now"])
    due, nxt = every.is_due(datetime.fromtimestamp(995.0, UTC))
    assert due and nxt == pytest.approx(9.8)
    due, nxt = every.is_due(datetime.fromtimestamp(1000.1, UTC))
    assert not due and nxt == pytest.approx(9.8)
    clock["now"] = datetime.fromtimestamp(1010.0, UTC)
    due, _ = every.is_due(datetime.fromtimestamp(1000.1, UTC))
    assert due
    # Celery's persistent scheduler pickles entries.
    import pickle

    restored = pickle.loads(pickle.dumps(aligned_every(10)))
    assert isinstance(restored, aligned_every) and restored.seconds == 10


def test_beat_entries_from_settings(make_app: Any) -> None:
    app = make_app(
        schedule={
            "disabled": ["taskyard.maintenance.run"],
            "intervals_s": {"taskyard.cache.warm": 42},
        }
    )
    entries = beat_entries(runtime_of(app))
    # Every worker runs a flusher (the default): the reaper is not sent through beat as well.
    assert set(entries) == {CACHE_WARM_TASK, STATS_COLLECT_TASK}
    assert entries[CACHE_WARM_TASK]["schedule"].seconds == 42
    assert all(e["task"] == name for name, e in entries.items())


def test_reaper_is_scheduled_only_without_worker_flushers_or_when_named(make_app: Any) -> None:
    no_flusher = beat_entries(runtime_of(make_app(batch={"worker_flusher": False})))
    # The reaper's 0.5 s default is raised to beat's 1 s floor.
    assert no_flusher[REAP_TASK]["schedule"].seconds == 1.0
    named = beat_entries(runtime_of(make_app(schedule={"intervals_s": {REAP_TASK: 30}})))
    assert named[REAP_TASK]["schedule"].seconds == 30


def test_interval_override_sets_the_single_flight_period(make_app: Any) -> None:
    from taskyard.cache.warming import WARM_JOB, warm
    from taskyard.maintenance import periodic_run

    app = make_app(
        schedule={
            "intervals_s": {
                CACHE_WARM_TASK: 3,
                STATS_COLLECT_TASK: 2,
                MAINTENANCE_TASK: 5,
            }
        }
    )
    runtime = runtime_of(app)
    settings = runtime.settings
    assert settings.cache.warm_interval_s == 300  # the section's own setting is unchanged
    assert schedule.job_interval_s(runtime, CACHE_WARM_TASK) == 3
    assert schedule.job_interval_s(runtime, STATS_COLLECT_TASK) == 2
    assert schedule.job_interval_s(runtime, MAINTENANCE_TASK) == 5
    entries = beat_entries(runtime)
    assert entries[CACHE_WARM_TASK]["schedule"].seconds == 3

    # A 3 s warm override runs once per 3 s period (it ran once per 300 s period before).
    runs = []
    deadline = time.time() + 8
    while time.time() < deadline:
        report = warm(runtime)
        if not report.get("skipped"):
            runs.append(report["period"])
        time.sleep(0.25)
    assert len(runs) >= 2 and len(set(runs)) == len(runs)
    assert all(r * 3 <= time.time() + 3 for r in runs)
    claim = runtime.keys.period_claim(WARM_JOB, runs[-1])
    assert 0 < runtime.redis.pttl(claim) <= 6_000

    app.tasks[STATS_COLLECT_TASK]()
    stats_claims = runtime.redis.keys(runtime.keys.period_claim("stats.collect", 0)[:-1] + "*")
    # Claimed for a 2 s period (TTL two periods), not the 10 s stats_interval_s.
    assert len(stats_claims) == 1 and 0 < runtime.redis.pttl(stats_claims[0]) <= 4_000

    periodic_run(runtime)
    (maintenance_claim,) = runtime.redis.keys(
        runtime.keys.period_claim("maintenance.run", 0)[:-1] + "*"
    )
    assert 0 < runtime.redis.pttl(maintenance_claim) <= 10_000


def test_install_keeps_a_scheduler_the_user_chose(make_app: Any) -> None:
    assert make_app().conf.beat_scheduler == "taskyard.beat:Scheduler"
    chosen = make_app(beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler")
    assert chosen.conf.beat_scheduler == "django_celery_beat.schedulers:DatabaseScheduler"
    assert "taskyard.cache.warm" in chosen.conf.beat_schedule


def test_each_part_declares_its_periodic_job_from_its_own_setting(make_app: Any) -> None:
    app = make_app(
        cache={"warm_interval_s": 30},
        maintenance={"interval_s": 600},
        monitoring={"stats_interval_s": 7},
        batch={"reaper_interval_s": 2},
    )
    jobs = runtime_of(app).periodic_jobs
    assert {task: (job.period_s, job.scheduled) for task, job in jobs.items()} == {
        CACHE_WARM_TASK: (30, True),
        MAINTENANCE_TASK: (600, True),
        STATS_COLLECT_TASK: (7, True),
        REAP_TASK: (2, False),  # the worker flushers scan instead (the default)
    }
    assert {name: e["schedule"].seconds for name, e in app.conf.beat_schedule.items()} == {
        CACHE_WARM_TASK: 30,
        MAINTENANCE_TASK: 600,
        STATS_COLLECT_TASK: 7,
    }
