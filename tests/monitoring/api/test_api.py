"""Stats API against real Redis: every endpoint's shape, fields, history, errors, gzip, OpenAPI."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from taskyard.config import Settings, load_settings
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.app import create_api
from taskyard.monitoring.api.state import MAX_PAGE_SIZE
from taskyard.monitoring.capture import Capture
from tests import servers

TOKEN = "s3cret-token"
LIST_ENDPOINTS = {
    "/api/v1/queues": m.QueueStats,
    "/api/v1/workers": m.WorkerStats,
    "/api/v1/tasks": m.TaskStats,
    "/api/v1/batches": m.BatchStats,
    "/api/v1/maintenance": m.MaintenanceRun,
    "/api/v1/alerts": m.Alert,
}


def api_settings(tmp_path: Path, **monitoring: Any) -> Settings:
    """Settings on the suite's Redis DB and a throwaway SQLite history; no response cache."""
    return load_settings(
        redis_url=servers.REDIS_URL,
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        monitoring={"api_cache_s": 0.0, **monitoring},
    )


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path, api_token=TOKEN)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def seed(settings: Settings, client: redis.Redis) -> float:
    """A known state: task counts and histograms, queue messages, a worker, a batch buffer, a
    cache namespace, alerts and a series; returns the time it was written."""
    from taskyard.keys import Keys
    from taskyard.monitoring.api.app import _resolve

    runtime, _app = _resolve(settings)
    capture = Capture(runtime)
    for _ in range(3):
        capture.count("app.add", "normal", "received")
        capture.count("app.add", "normal", "succeeded")
        capture.observe("app.add", "normal", "runtime", 0.02)
    capture.count("app.fail", "high", "failed", 2)
    capture.observe("app.fail", "high", "wait", 3.0)
    capture.flush()
    capture.close()
    keys = Keys(settings.namespace)
    now = time.time()
    client.lpush("normal", *[json.dumps({"n": i}) for i in range(4)])
    client.zadd(keys.workers(), {"w1@host": now})
    client.set(
        keys.worker_heartbeat("w1@host"),
        json.dumps({"hostname": "w1@host", "at": now, "memory_pct": 42.5, "cpu_pct": 12.0}),
        ex=60,
    )
    from taskyard.cache.core import cache_for

    cache = cache_for(runtime)
    for i in range(10):
        cache.get_or_compute("users", str(i % 9), lambda: {"name": "x"})
    cache.flush_stats()
    for alert_id, state, severity in (
        ("mem@w1", "firing", "critical"),
        ("depth@normal", "resolved", "warning"),
    ):
        client.hset(
            keys.alerts(),
            alert_id,
            json.dumps(
                {
                    "id": alert_id,
                    "alertname": alert_id.split("@")[0],
                    "severity": severity,
                    "state": state,
                    "since": now - 60,
                    "resolved_at": now if state == "resolved" else None,
                    "value": 95.0,
                    "threshold": 90.0,
                    "labels": {"hostname": "w1"},
                    "summary": "test alert",
                }
            ),
        )
    for i in range(10):
        client.lpush(keys.series("queues"), json.dumps({"at": 1000.0 + i, "depth": i}))
    return now


def test_health_live_and_ready(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live", "checks": {}}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"redis": "ok", "database": "ok", "broker": "ok"},
    }


def test_every_read_endpoint_has_its_documented_shape(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    seed(settings, redis_client)
    for path, model in LIST_ENDPOINTS.items():
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"] == "application/json"
        TypeAdapter(list[model]).validate_python(response.json())  # type: ignore[valid-type]

    queues = {q["queue"]: q for q in client.get("/api/v1/queues").json()}
    assert list(queues) == ["critical", "high", "normal", "low", "batch"]
    assert queues["normal"]["depth"] == 4 and queues["normal"]["ready"] == 4
    tasks = {(t["name"], t["queue"]): t for t in client.get("/api/v1/tasks").json()}
    assert tasks[("app.add", "normal")]["succeeded"] == 3
    assert tasks[("app.add", "normal")]["received"] == 3
    assert 0.01 <= tasks[("app.add", "normal")]["runtime_p50"] <= 0.025
    assert tasks[("app.fail", "high")]["failed"] == 2
    [worker] = client.get("/api/v1/workers").json()
    assert worker["hostname"] == "w1@host" and worker["alive"] is True
    assert (worker["memory_pct"], worker["cpu_pct"]) == (42.5, 12.0)
    firing = client.get("/api/v1/alerts").json()
    assert [a["id"] for a in firing] == ["mem@w1"]
    every = client.get("/api/v1/alerts", params={"include_resolved": "true"}).json()
    assert {a["id"] for a in every} == {"mem@w1", "depth@normal"}

    overview = client.get("/api/v1/overview").json()
    m.Overview.model_validate(overview)
    assert overview["totals"]["succeeded"] == 3 and overview["totals"]["failed"] == 2
    assert overview["queues"]["normal"] == 4
    assert overview["workers_alive"] == 1 and overview["alerts_firing"] == 1


def test_cache_endpoint_reports_hits_and_misses(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    seed(settings, redis_client)
    response = client.get("/api/v1/cache")
    assert response.status_code == 200, response.text
    [cache] = TypeAdapter(list[m.CacheStats]).validate_python(response.json())
    assert (cache.namespace, cache.hits, cache.misses) == ("users", 1, 9)


def test_fields_selects_and_rejects_unknown_names(client: TestClient) -> None:
    rows = client.get("/api/v1/queues", params={"fields": "queue,depth"}).json()
    assert rows[0] == {"queue": "critical", "depth": 0}
    assert all(set(row) == {"queue", "depth"} for row in rows)

    bad = client.get("/api/v1/queues", params={"fields": "queue,colour"})
    assert bad.status_code == 422
    [error] = bad.json()["detail"]
    assert error["loc"] == ["query", "fields"]
    assert "colour" in error["msg"] and "allowed: queue, depth, ready" in error["msg"]
    assert client.get("/api/v1/tasks", params={"fields": " , "}).status_code == 422


def test_history_time_range_pagination_and_fields(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    seed(settings, redis_client)
    url = "/api/v1/history/queues"
    page = client.get(
        url, params={"since": 1002, "until": "1970-01-01T00:16:47Z", "limit": 3}
    ).json()
    # 1002..1007 inclusive, newest first, three per page.
    assert [item["at"] for item in page["items"]] == [1007.0, 1006.0, 1005.0]
    assert (page["since"], page["until"], page["next_offset"]) == (1002.0, 1007.0, 3)
    last = client.get(
        url, params={"since": 1002, "until": 1007, "limit": 3, "offset": page["next_offset"]}
    ).json()
    assert [item["at"] for item in last["items"]] == [1004.0, 1003.0, 1002.0]
    assert last["next_offset"] is None

    picked = client.get(url, params={"fields": "depth", "limit": 2}).json()["items"]
    assert picked == [{"depth": 9}, {"depth": 8}]
    unknown = client.get(url, params={"fields": "depth,nope"})
    assert unknown.status_code == 422
    assert "nope" in unknown.text and "allowed: at, depth" in unknown.text


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("/api/v1/history/queues", {"since": "yesterday"}, "since"),
        ("/api/v1/history/queues", {"until": "2026-13-45"}, "until"),
        ("/api/v1/history/queues", {"since": "1e300"}, "since"),
        ("/api/v1/history/queues", {"since": "2000", "until": "1000"}, "until"),
        ("/api/v1/history/queues", {"limit": str(MAX_PAGE_SIZE + 1)}, "limit"),
        ("/api/v1/history/queues", {"limit": "0"}, "limit"),
        ("/api/v1/history/queues", {"offset": "-1"}, "offset"),
        ("/api/v1/history/queues", {"limit": "ten"}, "limit"),
        ("/api/v1/history/queues", {"fields": "a b"}, "fields"),
        ("/api/v1/alerts", {"include_resolved": "perhaps"}, "include_resolved"),
    ],
)
def test_malformed_parameters_are_422_naming_the_parameter(
    client: TestClient, path: str, params: dict[str, str], parameter: str
) -> None:
    response = client.get(path, params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert any(error["loc"][-1] == parameter and error["msg"] for error in body["detail"])


def test_unknown_routes_and_series_are_json_404(client: TestClient) -> None:
    for path in ("/nope", "/api/v1/nothing", "/api/v2/overview", "/api/v1/history/nope"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == "not_found"
    assert "known: overview, queues" in client.get("/api/v1/history/nope").json()["detail"]
    wrong_method = client.delete("/api/v1/overview")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]


def test_redis_down_is_503_json_never_500(tmp_path: Path) -> None:
    closed = load_settings(
        redis_url="redis://127.0.0.1:1/0",
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        monitoring={"api_cache_s": 0.0},
    )
    with TestClient(create_api(closed), raise_server_exceptions=False) as down:
        assert down.get("/health/live").status_code == 200
        ready = down.get("/health/ready")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["database"] == "ok"
        assert "ConnectionError" in checks["redis"] and "ConnectionError" in checks["broker"]
        for path in [
            "/api/v1/overview",
            "/metrics",
            "/api/v1/history/queues",
            "/api/v1/cache",
            *_reading_redis(LIST_ENDPOINTS),
        ]:
            response = down.get(path)
            assert response.status_code == 503, (path, response.text)
            body = response.json()
            assert body["error"] == "redis_unavailable"
            assert "127.0.0.1:1" in body["detail"] and "Traceback" not in body["detail"]


def test_database_down_is_503_naming_it(tmp_path: Path, redis_client: redis.Redis) -> None:
    closed = load_settings(
        redis_url=servers.REDIS_URL,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:1/test",
        monitoring={"api_cache_s": 0.0},
    )
    with TestClient(create_api(closed), raise_server_exceptions=False) as down:
        ready = down.get("/health/ready")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["redis"] == "ok" and checks["broker"] == "ok"
        assert "OperationalError" in checks["database"]
        # Redis holds no snapshots, so the page is read from the history database.
        history = down.get("/api/v1/history/queues", params={"since": 0})
        assert history.status_code == 503, history.text
        assert history.json()["error"] == "database_unavailable"
        assert down.get("/api/v1/queues").status_code == 200  # Redis-only reads go on


def test_broker_down_is_503_naming_it(tmp_path: Path, redis_client: redis.Redis) -> None:
    closed = load_settings(
        redis_url=servers.REDIS_URL,
        broker_url="amqp://guest:guest@127.0.0.1:1//",
        broker_connect_timeout_s=1.0,
        database_url=f"sqlite:///{tmp_path / 'h.db'}",
        monitoring={"api_cache_s": 0.0},
    )
    with TestClient(create_api(closed), raise_server_exceptions=False) as down:
        ready = down.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"] not in (None, "ok")
        queues = down.get("/api/v1/queues")
        assert queues.status_code == 503, queues.text
        assert queues.json()["error"] == "broker_unavailable"


def _reading_redis(paths: Iterable[str]) -> list[str]:
    """Endpoints that read Redis in this installation (batches only with the batching package's
    inspection)."""
    import taskyard.batching

    return [
        p for p in paths if p != "/api/v1/batches" or hasattr(taskyard.batching, "inspect_batches")
    ]


def test_gzip_for_responses_over_500_bytes(client: TestClient) -> None:
    big = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert big.headers["content-encoding"] == "gzip"
    raw = client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in raw.headers and len(raw.content) > 500

    def steady(text: str) -> list[str]:
        # Redis' own memory readings change between two scrapes (no response cache here).
        return [line for line in text.splitlines() if not line.startswith("taskyard_redis_")]

    assert steady(big.text) == steady(raw.text)  # httpx decoded the gzip body
    small = client.get("/health/live", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers
    with client.stream("GET", "/openapi.json", headers={"Accept-Encoding": "gzip"}) as stream:
        compressed = b"".join(stream.iter_raw())
    assert json.loads(gzip.decompress(compressed))["openapi"].startswith("3.")


def test_openapi_documents_every_endpoint_with_models(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in [
        "/health/live",
        "/health/ready",
        "/api/v1/overview",
        "/metrics",
        "/api/v1/history/{series}",
        "/api/v1/admin/cache/invalidate",
        "/api/v1/admin/maintenance/run",
        "/api/v1/admin/batches/{batch_name}/requeue",
        *LIST_ENDPOINTS,
    ]:
        assert path in paths, path
    queues = paths["/api/v1/queues"]["get"]["responses"]["200"]["content"]["application/json"]
    assert queues["schema"]["items"]["$ref"].endswith("/QueueStats")
    assert {"QueueStats", "TaskStats", "Alert", "HistoryPage", "ErrorBody"} <= set(
        schema["components"]["schemas"]
    )
    admin = paths["/api/v1/admin/maintenance/run"]["post"]
    assert admin["security"] == [{"adminToken": []}]
    assert schema["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
