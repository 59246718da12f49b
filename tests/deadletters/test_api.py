"""The dead letters in the stats API: search, one entry, task lookup, the gauge in /metrics, the
page, and replay and purge behind the admin token (401 without, 403 wrong, refused unset)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.deadletters import DeadLetter, RedisDeadLetterStore
from taskyard.keys import Keys
from taskyard.monitoring import timeline
from taskyard.monitoring.api.app import create_api
from tests.monitoring.api.test_api import TOKEN, api_settings

NOW = round(time.time(), 3)
ADMIN = [("/api/v1/dead/replay", {"all": True}), ("/api/v1/dead/purge", {"all": True})]


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path, api_token=TOKEN)


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> RedisDeadLetterStore:
    store = RedisDeadLetterStore(
        redis_client, Keys(settings.namespace), max_entries=100, retention_s=30 * 86_400
    )
    for i in range(5):
        store.record(
            DeadLetter(
                id=f"d{i}",
                reason="failed" if i < 3 else "poison",
                name="bdc.send" if i < 3 else "",
                queue="high",
                exception_type="ValueError" if i < 3 else "",
                detail="" if i < 3 else "unknown task 'x'",
                args=f"[{i}]",
                last_at=NOW - 10 + i,
            )
        )
    return store


@pytest.fixture
def client(settings: Settings, store: RedisDeadLetterStore) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_search_entry_and_gauge(client: TestClient) -> None:
    body = client.get("/api/v1/dead").json()
    assert body["total"] == 5 and [e["id"] for e in body["entries"]][:2] == ["d4", "d3"]
    failed = client.get("/api/v1/dead", params={"reason": "failed", "limit": 2}).json()
    assert failed["total"] == 3 and [e["id"] for e in failed["entries"]] == ["d2", "d1"]
    by_exc = client.get("/api/v1/dead", params={"exception": "ValueError", "offset": 2}).json()
    assert [e["id"] for e in by_exc["entries"]] == ["d0"]
    since = client.get("/api/v1/dead", params={"since": NOW - 7.5}).json()
    assert {e["id"] for e in since["entries"]} == {"d3", "d4"}
    bad = client.get("/api/v1/dead", params={"reason": "nope"})
    assert bad.status_code == 422
    assert client.get("/api/v1/dead/d1").json()["args"] == "[1]"
    missing = client.get("/api/v1/dead/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    metrics = client.get("/metrics").text
    assert 'taskyard_dead_tasks{name="bdc.send",queue_name="high",reason="failed"} 3.0' in metrics
    assert 'taskyard_dead_tasks{name="",queue_name="high",reason="poison"} 2.0' in metrics
    page = client.get("/dashboard/dead")
    assert page.status_code == 200 and "d4" in page.text and "bdc.send" in page.text


def test_task_lookup(client: TestClient, redis_client: redis.Redis, settings: Settings) -> None:
    key = Keys(settings.namespace).timeline_pending()
    now = time.time()
    redis_client.rpush(
        key,
        *[
            timeline.pack("t1", now + i, event, "bdc.send", "high", "w1")
            for i, event in enumerate(("sent", "received", "started", "succeeded"))
        ],
    )
    found = client.get("/api/v1/tasks/t1").json()
    assert found["state"] == "succeeded" and found["name"] == "bdc.send"
    assert [e["event"] for e in found["events"]] == ["sent", "received", "started", "succeeded"]
    assert found["dead"] is None
    dead_only = client.get("/api/v1/tasks/d1").json()
    assert dead_only["events"] == [] and dead_only["dead"]["reason"] == "failed"
    assert client.get("/api/v1/tasks/none-such").status_code == 404


@pytest.mark.parametrize(("path", "body"), ADMIN)
def test_admin_routes_need_the_token(
    client: TestClient, path: str, body: object, store: RedisDeadLetterStore
) -> None:
    assert client.post(path, json=body).status_code == 401
    assert client.post(path, json=body, headers={"Authorization": "Bearer no"}).status_code == 403
    assert store.count() == 5  # nothing happened


@pytest.mark.parametrize(("path", "body"), ADMIN)
def test_admin_routes_refused_without_a_configured_token(
    tmp_path: Path, redis_client: redis.Redis, store: RedisDeadLetterStore, path: str, body: object
) -> None:
    with TestClient(create_api(api_settings(tmp_path)), raise_server_exceptions=False) as c:
        response = c.post(path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403
    assert store.count() == 5


def test_replay_and_purge_with_the_token(client: TestClient, store: RedisDeadLetterStore) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    none = client.post("/api/v1/dead/purge", json={}, headers=auth)
    assert none.status_code == 422  # ids, a filter or all
    replayed = client.post("/api/v1/dead/replay", json={"name": "bdc.send"}, headers=auth)
    assert replayed.status_code == 200, replayed.text
    done = replayed.json()["detail"]["replayed"]
    assert set(done) == {"d0", "d1", "d2"}
    entry = store.get("d0")
    assert entry is not None and entry.state == "replayed" and entry.replayed_as == done["d0"]
    again = client.post("/api/v1/dead/replay", json={"ids": ["d0"]}, headers=auth)
    assert again.status_code == 409 and "already replayed" in again.json()["detail"]
    poison = client.post("/api/v1/dead/replay", json={"reason": "poison"}, headers=auth).json()
    assert poison["detail"]["replayed"] == {} and set(poison["detail"]["skipped"]) == {"d3", "d4"}
    purged = client.post("/api/v1/dead/purge", json={"reason": "poison"}, headers=auth)
    assert purged.json()["detail"]["purged"] == 2
    assert store.count() == 0
    everything = client.post("/api/v1/dead/purge", json={"all": True}, headers=auth)
    assert everything.json()["detail"]["purged"] == 3  # the replayed entries


def _iso(at: float) -> str:
    """``at`` as an ISO 8601 timestamp in UTC, to the millisecond."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")


def test_search_takes_iso_times(client: TestClient) -> None:
    since = client.get("/api/v1/dead", params={"since": _iso(NOW - 7.5)}).json()
    assert {e["id"] for e in since["entries"]} == {"d3", "d4"}
    window = {"since": _iso(NOW - 8.5), "until": _iso(NOW - 6.5).replace("+00:00", "Z")}
    assert [e["id"] for e in client.get("/api/v1/dead", params=window).json()["entries"]] == [
        "d3",
        "d2",
    ]
    # Without a zone a timestamp is UTC; epoch seconds still work.
    naive = _iso(NOW - 7.5).removesuffix("+00:00")
    assert client.get("/api/v1/dead", params={"since": naive}).json()["total"] == 2
    assert client.get("/api/v1/dead", params={"until": str(NOW - 9.5)}).json()["total"] == 1


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"since": "yesterday"}, "'yesterday' is neither seconds since the epoch nor an ISO"),
        ({"until": "2026-13-01"}, "'2026-13-01' is neither"),
        ({"since": "1e300"}, "out of range"),
        ({"since": _iso(NOW), "until": _iso(NOW - 60)}, "is before since"),
    ],
)
def test_search_refuses_other_times(
    client: TestClient, params: dict[str, str], expected: str
) -> None:
    response = client.get("/api/v1/dead", params=params)
    assert response.status_code == 422, response.text
    assert expected in response.text


def test_purge_selection_takes_iso_times(client: TestClient, store: RedisDeadLetterStore) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = client.post("/api/v1/dead/purge", json={"since": "soon"}, headers=auth)
    assert bad.status_code == 422 and "'soon' is neither" in bad.text
    assert store.count() == 5
    backwards = {"since": _iso(NOW), "until": _iso(NOW - 60)}
    assert client.post("/api/v1/dead/purge", json=backwards, headers=auth).status_code == 422
    purged = client.post("/api/v1/dead/purge", json={"until": _iso(NOW - 8.5)}, headers=auth)
    assert purged.status_code == 200, purged.text
    assert purged.json()["detail"]["purged"] == 2  # d0 and d1
    assert store.get("d1") is None and store.get("d2") is not None
