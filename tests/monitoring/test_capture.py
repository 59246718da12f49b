"""Capture: the in-process buffer, its batched flush, and exact counts from a real worker."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskyard.monitoring.capture import BUCKET_LABELS, SEP, Capture, bucket_index
from taskyard.monitoring.store import StatsStore, parse_counts, parse_histogram, quantile
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers


def test_bucket_index_edges() -> None:
    assert bucket_index(0.0) == 0
    assert bucket_index(0.005) == 0  # upper bounds are inclusive, like Prometheus' "le"
    assert bucket_index(0.0051) == 1
    assert bucket_index(1e9) == len(BUCKET_LABELS) - 1


def test_quantile_interpolates_inside_bucket() -> None:
    counts = [0] * len(BUCKET_LABELS)
    counts[bucket_index(0.3)] = 100  # all in (0.25, 0.5]
    assert quantile(counts, 0.5) == pytest.approx(0.375)
    assert quantile([0] * len(BUCKET_LABELS), 0.5) is None


def test_flush_writes_buffer_in_one_batch(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("cap")
    runtime = runtime_of(app)
    capture = Capture(runtime)
    for _ in range(7):
        capture.count("t.a", "high", "received")
    capture.started("t.a", "high", 0.02)
    capture.finished("t.a", "high", "succeeded", 0.3)
    capture.finished("t.a", "high", "failed", 3.0)
    assert redis_client.hlen(runtime.keys.task_counts()) == 0  # nothing before the flush
    assert capture.flush() > 0
    counts = parse_counts(redis_client.hgetall(runtime.keys.task_counts()))
    assert counts[("t.a", "high")]["received"] == 7
    assert counts[("t.a", "high")]["succeeded"] == 1
    assert counts[("t.a", "high")]["failed"] == 1
    runtime_hist = parse_histogram(redis_client.hgetall(runtime.keys.task_histogram("runtime")))
    entry = runtime_hist[("t.a", "high")]
    assert entry["count"] == 2
    assert entry["sum"] == pytest.approx(3.3)
    assert entry["counts"][bucket_index(0.3)] == 1
    assert capture.flush() == 0  # buffer emptied


def test_failed_flush_keeps_counts(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("cap-down")
    runtime = runtime_of(app)
    capture = Capture(runtime)
    capture.count("t.b", "low", "started", 3)
    good = runtime.redis
    runtime._redis = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        assert capture.flush() == 0  # logged, not raised
    finally:
        runtime._redis = good
    capture.count("t.b", "low", "started", 2)
    capture.flush()
    field = f"t.b{SEP}low{SEP}started"
    assert int(redis_client.hget(runtime.keys.task_counts(), field) or 0) == 5


def test_an_outage_is_logged_once_with_its_traceback_then_briefly(
    make_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A flusher failing every tick logs the first failure with its traceback, not every one."""
    caplog.set_level(logging.INFO, logger="taskyard.monitoring.capture")
    app = make_app("cap-outage")
    runtime = runtime_of(app)
    capture = Capture(runtime)
    good = runtime.redis
    runtime._redis = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        for _ in range(5):
            capture.count("t.c", "low", "started")
            assert capture.flush() == 0
    finally:
        runtime._redis = good
    failures = [r for r in caplog.records if "metrics failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert capture.flush() > 0
    assert "works again after 5 failures" in caplog.text
    capture.close()


def test_closing_the_app_stops_its_background_threads(make_app: Any) -> None:
    """app.close() flushes and stops the capture and task-sent threads, so an app whose Redis
    is gone leaves no thread retrying behind it."""
    import threading

    names = ("taskyard-capture-flush", "taskyard-sent-events")

    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name in names and t.is_alive()}

    before = ours()
    app = make_app("cap-close")

    @app.task(name="t.close")
    def noop() -> None:
        return None

    noop.delay()
    runtime = runtime_of(app)
    assert isinstance(runtime.capture, Capture)
    runtime.capture.count("t.close", "normal", "started")

    started = ours() - before
    assert {t.name for t in started} == {"taskyard-capture-flush", "taskyard-sent-events"}
    app.close()
    for thread in started:
        thread.join(10)
    assert not [t.name for t in started if t.is_alive()]


N = 8


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])  # solo: the lean path
def test_known_workload_counts_match_exactly(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path, pool: str
) -> None:
    from tests.apps import monitor

    servers.require("redis")
    producer = make_app("monitor")  # same settings as the worker's app, on the test database
    store = StatsStore(runtime_of(producer))
    env = {
        **redis_env,
        "TASKYARD_MONITORING__FLUSH_INTERVAL_S": "0.2",
        # The shared test machine is often CPU-busy: no resource guard holds work back here.
        "TASKYARD_GUARD__ENABLED": "false",
    }
    with celery_worker(
        "tests.apps.monitor",
        "critical,high,normal,low,batch",
        env,
        tmp_path,
        concurrency=2,
        name="monitor",
        pool=pool,
    ):
        for i in range(N):
            producer.send_task(monitor.ok.name, args=(i,))
            producer.send_task(monitor.boom.name, args=(i,))
            producer.send_task(monitor.retry_once.name, args=(i,))
            producer.send_task(monitor.deferred_once.name, args=(i,))
        expected = {
            ("tests.apps.monitor.ok", "normal"): {"received": N, "started": N, "succeeded": N},
            ("tests.apps.monitor.boom", "normal"): {"received": N, "started": N, "failed": N},
            ("tests.apps.monitor.retry_once", "normal"): {
                "received": 2 * N,
                "started": 2 * N,
                "retried": N,
                "succeeded": N,
            },
            ("tests.apps.monitor.deferred_once", "low"): {
                "received": N,
                "started": N,
                "succeeded": N,
                "deferred": N,
            },
        }

        def rows() -> dict[tuple[str, str], dict[str, Any]]:
            return {(t["name"], t["queue"]): t for t in store.tasks()}

        def matches() -> bool:
            got = rows()
            return all(
                key in got and all(got[key][e] == n for e, n in want.items())
                for key, want in expected.items()
            )

        wait_until(matches, 60, 0.2, f"counts {expected}, have {rows()}")
        time.sleep(0.6)  # a few more flushes: nothing is counted twice
        got = rows()
    for key, want in expected.items():
        for event in ("received", "started", "succeeded", "failed", "retried", "deferred"):
            assert got[key][event] == want.get(event, 0), (key, event, got[key])
    hist = store.histograms()
    runtime_counts = {(h["name"], h["queue"]): h["count"] for h in hist["runtime"]}
    wait_counts = {(h["name"], h["queue"]): h["count"] for h in hist["wait"]}
    for key, want in expected.items():
        assert runtime_counts[key] == want["started"]  # one runtime per run, whatever its end
        assert wait_counts[key] == want["started"]  # every message carried its sent time
    row = got[("tests.apps.monitor.ok", "normal")]
    # A trivial task: well under a second even on a loaded machine (a bound, not a timing).
    assert row["runtime_p50"] is not None and row["runtime_p50"] < 5
    assert row["wait_p99"] is not None and row["wait_p99"] < 60


@pytest.mark.slow
def test_children_flush_when_they_exit(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    """With a flush interval far beyond the test, counts can only come from exit flushes:
    each child is replaced after one task and the parent flushes at shutdown."""
    from tests.apps import monitor

    producer = make_app("monitor")
    store = StatsStore(runtime_of(producer))
    env = {
        **redis_env,
        "TASKYARD_MONITORING__FLUSH_INTERVAL_S": "3600",
        "TASKYARD_GUARD__ENABLED": "false",
    }
    with celery_worker(
        "tests.apps.monitor",
        "normal",
        env,
        tmp_path,
        concurrency=2,
        name="recycle",
        extra=("--max-tasks-per-child", "1"),
    ) as worker:
        for i in range(6):
            producer.send_task(monitor.ok.name, args=(i,))

        def started() -> int:
            return sum(t["started"] for t in store.tasks())

        # Each child exits (and flushes) after its one task; the parent, which counts
        # "received", flushes only when it shuts down.
        wait_until(lambda: started() == 6, 60, 0.2, f"exit flushes, have {store.tasks()}")
        assert store.tasks()[0]["received"] == 0
        # SIGTERM to the parent: warm shutdown, every process flushes on its way out.
        os.kill(worker.pid, signal.SIGTERM)
        worker.process.wait(30)
    (row,) = store.tasks()
    assert (row["received"], row["started"], row["succeeded"]) == (6, 6, 6)


def test_failing_hook_is_logged_not_raised(
    make_app: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.app.task import Context

    from taskyard.monitoring.capture import _Receivers

    app = make_app("cap-hook")
    capture = Capture(runtime_of(app))
    receivers = _Receivers(app, capture)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("capture bug")

    monkeypatch.setattr(capture, "started", broken)
    task = type("T", (), {"app": app, "name": "t.x", "queue": "normal"})()
    task.request = Context({"delivery_info": {"routing_key": "normal"}})
    receivers.prerun(sender=task, task=task)  # must not raise
    assert "task_prerun hook failed" in caplog.text


def test_wait_is_measured_from_the_eta() -> None:
    from datetime import UTC, datetime

    from celery.app.task import Context

    from taskyard.monitoring.capture import SENT_HEADER, _sent_at

    sent = 1_000.0
    eta = datetime.fromtimestamp(1_030.0, tz=UTC).isoformat()
    assert _sent_at(Context({SENT_HEADER: sent})) == sent
    assert _sent_at(Context({SENT_HEADER: sent, "eta": eta})) == 1_030.0
    assert _sent_at(Context({})) is None


@pytest.mark.parametrize("sent", ["not a number", "nan", [1], "1e999"])
def test_a_sent_time_that_is_not_a_number_costs_the_wait_only(make_app: Any, sent: Any) -> None:
    from celery.app.task import Context

    from taskyard.monitoring.capture import SENT_HEADER, _sent_at

    assert _sent_at(Context({SENT_HEADER: sent})) is None
    capture = Capture(runtime_of(make_app("cap-sent")))
    capture.run_started("id-1", "t.x", "normal", "w", time.time(), {SENT_HEADER: sent}, "")
    prefix = f"t.x{SEP}normal{SEP}"
    # Both steps counted and recorded on the timeline; no wait observed from the bad header.
    assert capture._counts == {prefix + "received": 1, prefix + "started": 1}
    assert capture._hist["wait"] == {}
    assert len(capture._events) == 2
