"""Admin endpoints: bearer token required (401 without, 403 wrong, refused when unset)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.monitoring.api.app import create_api
from taskyard.routing.levels import LEVEL_NAMES
from taskyard.runtime import runtime_of
from tests.monitoring.api.test_api import TOKEN, api_settings

ADMIN_POSTS = [
    ("/api/v1/admin/cache/invalidate", {"tags": ["user:7"]}),
    ("/api/v1/admin/maintenance/run", None),
    ("/api/v1/admin/batches/emails/requeue", {}),
]


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path, api_token=TOKEN)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(("path", "body"), ADMIN_POSTS)
def test_admin_without_token_is_401_with_bearer_challenge(
    client: TestClient, path: str, body: object
) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(("path", "body"), ADMIN_POSTS)
def test_admin_with_wrong_token_is_403(client: TestClient, path: str, body: object) -> None:
    for wrong in ("nope", TOKEN + "x", TOKEN[:-1], "s3cret-tokén"):
        # Header bytes beyond ASCII arrive as latin-1 text; they must be refused, not crash.
        header = f"Bearer {wrong}".encode("latin-1")
        response = client.post(path, json=body, headers={"Authorization": header})
        assert response.status_code == 403, (wrong, response.text)
        assert response.json()["detail"] == "wrong bearer token"


def test_admin_refused_when_no_token_is_configured(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    with TestClient(create_api(api_settings(tmp_path)), raise_server_exceptions=False) as open_:
        for path, body in ADMIN_POSTS:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
                response = open_.post(path, json=body, headers=headers)
                assert response.status_code == 403, (path, headers)
                assert "TASKYARD_MONITORING__API_TOKEN" in response.json()["detail"]


def test_token_comparison_is_constant_time_and_exact() -> None:
    import hmac
    from unittest import mock

    from taskyard.monitoring.api.users import same_secret

    with mock.patch(
        "taskyard.monitoring.api.users.hmac.compare_digest", wraps=hmac.compare_digest
    ) as compare:
        assert same_secret("abc", "abc") and not same_secret("abc", "abd")
    compare.assert_any_call(b"abc", b"abc")
    assert not same_secret("ab\udcff", "abc")  # undecodable text compares, never raises


def test_clear_cache_by_tag_with_the_right_token(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    from taskyard.cache.core import cache_for
    from taskyard.monitoring.api.app import _resolve

    runtime, _ = _resolve(settings)
    cache = cache_for(runtime)
    calls = []

    def compute() -> str:
        calls.append(1)
        return "v"

    cache.get_or_compute("users", "7", compute, tags=["user:7"])
    cache.get_or_compute("users", "8", compute, tags=["user:8"])
    assert len(calls) == 2
    response = client.post(
        "/api/v1/admin/cache/invalidate",
        json={"tags": ["user:7"]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"action": "cache.invalidate", "detail": {"deleted": {"user:7": 1}}}
    cache.get_or_compute("users", "8", compute, tags=["user:8"])
    assert len(calls) == 2  # user:8 untouched
    cache.get_or_compute("users", "7", compute, tags=["user:7"])
    assert len(calls) == 3  # user:7 recomputed


def test_admin_body_is_validated(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bodies: list[dict[str, Any]] = [{}, {"tags": []}, {"tags": [""]}, {"tags": "user:7"}]
    for body in bodies:
        response = client.post("/api/v1/admin/cache/invalidate", json=body, headers=auth)
        assert response.status_code == 422, body
    not_json = client.post(
        "/api/v1/admin/cache/invalidate",
        content=b"{",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 422


def test_run_maintenance_queues_the_task(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post(
        "/api/v1/admin/maintenance/run", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 202, response.text
    detail = response.json()["detail"]
    assert detail["task"] == "taskyard.maintenance.run" and detail["task_id"]
    # Routed like any taskyard task: to the level the maintenance task declares (low).
    depths = {q: int(redis_client.llen(q)) for q in LEVEL_NAMES}
    assert depths == {q: int(q == "low") for q in LEVEL_NAMES}


def test_requeue_dead_batch(
    client: TestClient, settings: Settings, make_app: Any, redis_client: redis.Redis
) -> None:
    from taskyard.batching import batch_task
    from taskyard.batching.buffer import BatchBuffer

    app = make_app("apiadmin", database_url=settings.database_url)

    @batch_task(batch_name="emails", batch_size=2, max_retries=0)
    def send_emails(items: list[Any]) -> None:  # pragma: no cover - no worker runs it
        raise AssertionError("not run here")

    send_emails.add_many([{"to": 1}, {"to": 2}])
    [message] = redis_client.lrange("batch", 0, -1)
    [batch_id] = json.loads(base64.b64decode(json.loads(message)["body"]))[0]
    runtime = runtime_of(app)
    buffer = BatchBuffer(redis_client, runtime.keys, "emails")
    assert buffer.acquire(batch_id, "tok", 60_000).status == "ok"
    buffer.fail(batch_id, "tok", max_retries=0, backoff_ms=0, lease_ms=60_000, error="boom")
    assert buffer.dead_ids() == [batch_id]

    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/api/v1/admin/batches/emails/requeue", json={}, headers=auth)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "action": "batches.requeue",
        "detail": {"batch_name": "emails", "requeued": [batch_id]},
    }
    assert buffer.dead_ids() == []
    assert redis_client.llen("batch") == 2  # the flush message published again

    unknown = client.post("/api/v1/admin/batches/nope/requeue", json={}, headers=auth)
    assert unknown.status_code == 404 and "'nope' is unknown" in unknown.json()["detail"]
