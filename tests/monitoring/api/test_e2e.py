"""The API over a real worker: what the worker did shows, exactly, in the API and /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.app import create_api
from taskyard.testing import celery_worker, wait_until
from tests.monitoring.api.test_api import api_settings


@pytest.mark.slow
def test_worker_activity_reaches_api_and_metrics(
    tmp_path: Path, redis_client: redis.Redis, redis_env: dict[str, str], make_app: Any
) -> None:
    from tests.apps import monitor

    producer = make_app("monitor")  # the worker's settings, on the test database
    settings = api_settings(tmp_path)
    # Guards off: on a busy machine they would hold the tasks back (heartbeats still run).
    env = {**redis_env, "TASKYARD_GUARD__ENABLED": "false"}
    with (
        celery_worker("tests.apps.monitor", "normal", env, tmp_path, concurrency=2, name="apie2e"),
        TestClient(create_api(settings)) as client,
    ):
        for i in range(5):
            producer.send_task(monitor.ok.name, args=(i,))
        for i in range(3):
            producer.send_task(monitor.boom.name, args=(i,))

        def counts() -> dict[tuple[str, str], m.TaskStats]:
            rows = TypeAdapter(list[m.TaskStats]).validate_python(
                client.get("/api/v1/tasks").json()
            )
            return {(row.name, row.queue): row for row in rows}

        ok_key, boom_key = (
            ("tests.apps.monitor.ok", "normal"),
            ("tests.apps.monitor.boom", "normal"),
        )
        wait_until(
            lambda: (
                ok_key in counts()
                and boom_key in counts()
                and counts()[ok_key].succeeded == 5
                and counts()[boom_key].failed == 3
            ),
            30,
            0.2,
            "the worker's counts in /api/v1/tasks",
        )
        ok, boom = counts()[ok_key], counts()[boom_key]
        assert (ok.received, ok.started, ok.failed) == (5, 5, 0)
        assert (boom.received, boom.succeeded) == (3, 0)
        assert ok.runtime_p50 is not None and ok.wait_p99 is not None

        wait_until(
            lambda: any(w["alive"] for w in client.get("/api/v1/workers").json()),
            15,
            0.2,
            "the worker's heartbeat",
        )
        workers = TypeAdapter(list[m.WorkerStats]).validate_python(
            client.get("/api/v1/workers").json()
        )
        [worker] = [w for w in workers if w.hostname.startswith("apie2e@")]
        assert worker.alive and worker.queues == ["normal"] and worker.memory_pct is not None

        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families.values()
            for s in f.samples
        }
        labels = (("name", "tests.apps.monitor.ok"), ("queue_name", "normal"))
        assert samples[("celery_task_succeeded_total", labels)] == 5
        assert samples[("celery_task_runtime_seconds_count", labels)] == 5
        assert samples[("celery_worker_up", (("hostname", worker.hostname),))] == 1
        overview = client.get("/api/v1/overview").json()
        assert overview["totals"]["succeeded"] >= 5 and overview["workers_alive"] >= 1
