"""The job-control routes: cancel one and many (admin token), the lookup's cancel record and
progress, the job counters in /metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.keys import Keys
from taskyard.monitoring.api.app import create_api
from tests.monitoring.api.test_api import TOKEN, api_settings

KEYS = Keys()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path, api_token=TOKEN)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_cancel_by_filter_and_lookup(
    client: TestClient, make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    records = jobs.record.delay_many((i,) for i in range(5))
    noop = jobs.noop.delay(1)
    assert client.post("/api/v1/tasks/cancel", json={"name": "*.record"}).status_code in (
        401,
        403,
    )
    dry = client.post(
        "/api/v1/tasks/cancel", json={"name": "*.record", "dry_run": True}, headers=AUTH
    ).json()
    assert dry["detail"]["selected"] == 5 and dry["detail"]["cancelled"] == 0
    assert redis_client.zcard(KEYS.cancel_index()) == 0
    done = client.post(
        "/api/v1/tasks/cancel", json={"name": "*.record", "queue": "normal"}, headers=AUTH
    ).json()["detail"]
    assert done["cancelled"] == 5
    assert {f["task_id"] for f in done["found"]} == set(records)
    assert {f["where"] for f in done["found"]} == {"queued"}
    one = client.post(f"/api/v1/tasks/{noop.id}/cancel?terminate=true", headers=AUTH)
    assert one.json()["detail"] == {"task_id": noop.id, "new": 1}
    body = client.get(f"/api/v1/tasks/{noop.id}").json()
    assert body["cancel"]["by"] == "api:admin-token" and body["cancel"]["terminate"] is True
    assert body["progress"] is None
    assert client.post("/api/v1/tasks/cancel", json={}, headers=AUTH).status_code == 400


def test_progress_in_the_lookup_and_counters_in_metrics(
    client: TestClient, make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    redis_client.set(
        KEYS.progress("t1"), json.dumps({"done": 3, "total": 10, "detail": "x", "at": 1.0})
    )
    assert client.get("/api/v1/tasks/t1").json()["progress"]["done"] == 3
    first = jobs.once.delay("k")
    assert jobs.once.delay("k").id == first.id
    text = client.get("/metrics").text
    assert f'taskyard_job_events_total{{event="deduplicated",name="{jobs.once.name}"}} 1.0' in text


def test_the_dashboards_task_page_shows_progress_and_the_cancel(
    client: TestClient, redis_client: redis.Redis
) -> None:
    redis_client.set(
        KEYS.progress("t2"),
        json.dumps({"done": 7, "total": 9, "detail": "<b>rows</b>", "at": 1.0}),
    )
    cancelled = client.post("/api/v1/tasks/t2/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text
    page = client.get("/dashboard/task/t2")
    assert page.status_code == 200
    assert 'id="task-progress">7 / 9 (&lt;b&gt;rows&lt;/b&gt;)' in page.text
    assert 'id="task-cancel"' in page.text and "by api:admin-token" in page.text
