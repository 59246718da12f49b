"""/metrics: Prometheus text that parses, with conventional names, base units and true values."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from taskyard.config import Settings
from taskyard.keys import Keys
from taskyard.monitoring.api.app import create_api
from taskyard.monitoring.metrics import histogram_series
from tests.monitoring.api.test_api import api_settings, seed

EXPECTED = {
    # family name (as the parser reports it) -> (type, labels of its samples)
    "celery_queue_length": ("gauge", {"queue_name"}),
    "celery_task_received": ("counter", {"name", "queue_name"}),
    "celery_task_succeeded": ("counter", {"name", "queue_name"}),
    "celery_task_failed": ("counter", {"name", "queue_name"}),
    "celery_task_retried": ("counter", {"name", "queue_name"}),
    "taskyard_task_deferred": ("counter", {"name", "queue_name"}),
    "celery_task_runtime_seconds": ("histogram", {"name", "queue_name"}),
    "celery_task_wait_seconds": ("histogram", {"name", "queue_name"}),
    "celery_workers_alive": ("gauge", set()),
    "celery_worker_up": ("gauge", {"hostname"}),
    "taskyard_worker_memory_percent": ("gauge", {"hostname"}),
    "taskyard_batch_buffered_items": ("gauge", {"batch_name"}),
    "taskyard_cache_hits": ("counter", {"namespace"}),
    "taskyard_alert_active": ("gauge", {"alertname", "severity"}),
}


def scrape(client: TestClient) -> dict[str, Any]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    family = families[
        sample_name.removesuffix("_total")
        .removesuffix("_bucket")
        .removesuffix("_count")
        .removesuffix("_sum")
    ]
    matches = [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (sample_name, labels, family.samples)
    return float(matches[0])


def test_metrics_parse_with_conventional_names_and_values(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    settings: Settings = api_settings(tmp_path)
    seed(settings, redis_client)
    with TestClient(create_api(settings)) as client:
        families = scrape(client)
    for name, (kind, labels) in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)

    assert value(families, "celery_queue_length", queue_name="normal") == 4
    assert value(families, "celery_queue_length", queue_name="critical") == 0
    assert value(families, "celery_task_succeeded_total", name="app.add", queue_name="normal") == 3
    assert value(families, "celery_task_failed_total", name="app.fail", queue_name="high") == 2
    # Runtime 0.02 s x3 falls in the 0.025 bucket: cumulative counts, +Inf equals _count.
    assert (
        value(
            families,
            "celery_task_runtime_seconds_bucket",
            name="app.add",
            queue_name="normal",
            le="0.01",
        )
        == 0
    )
    assert (
        value(
            families,
            "celery_task_runtime_seconds_bucket",
            name="app.add",
            queue_name="normal",
            le="0.025",
        )
        == 3
    )
    assert (
        value(
            families,
            "celery_task_runtime_seconds_bucket",
            name="app.add",
            queue_name="normal",
            le="+Inf",
        )
        == 3
    )
    assert (
        value(families, "celery_task_runtime_seconds_count", name="app.add", queue_name="normal")
        == 3
    )
    assert (
        abs(
            value(families, "celery_task_runtime_seconds_sum", name="app.add", queue_name="normal")
            - 0.06
        )
        < 1e-9
    )
    assert (
        value(
            families,
            "celery_task_wait_seconds_bucket",
            name="app.fail",
            queue_name="high",
            le="5.0",
        )
        == 1
    )
    assert value(families, "celery_workers_alive") == 1
    assert value(families, "celery_worker_up", hostname="w1@host") == 1
    assert value(families, "taskyard_alert_active", alertname="mem", severity="critical") == 1
    assert value(families, "taskyard_cache_hits_total", namespace="users") == 1


def test_worker_gone_and_resources(tmp_path: Path, redis_client: redis.Redis) -> None:
    settings = api_settings(tmp_path)
    keys = Keys(settings.namespace)
    now = time.time()
    redis_client.zadd(keys.workers(), {"old@host": now - 60, "new@host": now})
    redis_client.set(
        keys.worker_heartbeat("new@host"),
        json.dumps({"hostname": "new@host", "at": now, "memory_pct": 42.5, "cpu_pct": 7.0}),
    )
    with TestClient(create_api(settings)) as client:
        families = scrape(client)
    assert value(families, "celery_workers_alive") == 1
    assert value(families, "celery_worker_up", hostname="old@host") == 0
    assert value(families, "celery_worker_up", hostname="new@host") == 1
    assert value(families, "taskyard_worker_memory_percent", hostname="new@host") == 42.5
    assert value(families, "taskyard_worker_cpu_percent", hostname="new@host") == 7.0


def test_each_api_has_its_own_registry(tmp_path: Path, redis_client: redis.Redis) -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    first = create_api(api_settings(tmp_path))
    second = create_api(api_settings(tmp_path, api_cache_s=5.0))
    with TestClient(first) as one, TestClient(second) as two:
        assert "celery_queue_length" in scrape(one) and "celery_queue_length" in scrape(two)
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


def test_histogram_series_is_cumulative_with_overflow() -> None:
    data = {
        "buckets": [0.1, 1.0],
        "runtime": [{"name": "t", "queue": "low", "counts": [2, 0, 5], "sum": 42.0}],
    }
    [series] = histogram_series(data, "runtime")
    assert series["buckets"] == [("0.1", 2.0), ("1.0", 2.0), ("+Inf", 7.0)]
    assert series["sum"] == 42.0
    assert list(histogram_series(data, "wait")) == []


def test_per_queue_depth_oldest_ready_age_and_wait_histogram(
    tmp_path: Path, redis_client: redis.Redis, make_app: Any
) -> None:
    """Real messages sent through a taskyard app: the oldest one's age per queue, read from the
    tail of the priority sub-lists, and the wait histogram summed over task names per queue."""
    from taskyard.monitoring.capture import Capture
    from taskyard.monitoring.metrics import queue_wait
    from taskyard.runtime import runtime_of

    settings: Settings = api_settings(tmp_path)
    app = make_app("ages", database_url=settings.database_url)
    app.send_task("t.first", queue="low", routing_key="low")
    time.sleep(0.3)
    app.send_task("t.second", queue="low", routing_key="low", priority=9)
    app.send_task("t.third", queue="high", routing_key="high")
    capture = Capture(runtime_of(app))
    for name, queue, wait in (("a", "normal", 0.003), ("b", "normal", 0.2), ("c", "low", 7.0)):
        capture.count(name, queue, "started")
        capture.observe(name, queue, "wait", wait)
    capture.flush()
    capture.close()
    with TestClient(create_api(settings)) as client:
        rows = {q["queue"]: q for q in client.get("/api/v1/queues").json()}
        families = scrape(client)
    assert rows["low"]["ready"] == 2 and rows["critical"]["oldest_ready_age_s"] is None
    low_age, high_age = rows["low"]["oldest_ready_age_s"], rows["high"]["oldest_ready_age_s"]
    assert 0.3 <= low_age < 30 and 0 <= high_age < low_age - 0.2
    assert value(families, "taskyard_queue_oldest_ready_age_seconds", queue_name="low") >= 0.3
    assert not [
        s
        for s in families["taskyard_queue_oldest_ready_age_seconds"].samples
        if s.labels["queue_name"] == "critical"
    ]  # empty: no sample, not 0
    assert value(families, "celery_queue_length", queue_name="low") == 2
    assert "taskyard_queue_scheduled_messages" in families
    # The normal queue's two tasks, one histogram: 0.003 s falls in le=0.005, 0.2 s in le=0.25.
    assert value(families, "taskyard_queue_wait_seconds_count", queue_name="normal") == 2
    assert (
        value(families, "taskyard_queue_wait_seconds_bucket", queue_name="normal", le="0.005") == 1
    )
    assert (
        value(families, "taskyard_queue_wait_seconds_bucket", queue_name="normal", le="0.25") == 2
    )
    assert value(families, "taskyard_queue_wait_seconds_sum", queue_name="normal") == pytest.approx(
        0.203
    )
    assert value(families, "taskyard_queue_wait_seconds_count", queue_name="low") == 1
    assert queue_wait({"buckets": [], "wait": []}) == {}
