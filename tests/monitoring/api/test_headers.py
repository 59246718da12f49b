"""Every answer of the stats API says ``nosniff``; every HTML answer carries a content policy
(the dashboard's own on every page, /dead included; /docs its wider one) -- JSON, Prometheus
text, static files and errors (404, 422, 503, 500) alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.monitoring.api.app import create_api
from taskyard.monitoring.api.headers import PAGE_POLICY
from taskyard.monitoring.store import StatsStore
from taskyard.runtime import Runtime
from tests.monitoring.api.test_api import api_settings

PAGES = [
    "/dashboard",
    "/dashboard?fragment=true",
    "/dashboard/workers",
    "/dashboard/tasks",
    "/dashboard/tasks/bdc.send",
    "/dashboard/task/some-task-id",
    "/dashboard/dead",
]
OTHERS = [
    ("/api/v1/queues", 200, "application/json"),
    ("/api/v1/alerts/history", 200, "application/json"),
    ("/metrics", 200, "text/plain"),
    ("/health/live", 200, "application/json"),
    ("/static/taskyard/dashboard.css", 200, "text/css"),
    ("/api/v1/dead/no-such-entry", 404, "application/json"),
    ("/api/v1/history/queues?limit=0", 422, "application/json"),
    ("/no/such/route", 404, "application/json"),
]


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("path", PAGES)
def test_every_page_has_the_policy_and_nosniff(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["Content-Security-Policy"] == PAGE_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # gzipped pages too (the pages' own cache answers them)
    zipped = client.get(path, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Security-Policy"] == PAGE_POLICY
    assert zipped.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(("path", "status", "media"), OTHERS)
def test_every_other_answer_has_nosniff(
    client: TestClient, path: str, status: int, media: str
) -> None:
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(media)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" not in response.headers  # not HTML: no policy needed


def test_docs_keep_their_own_policy(client: TestClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "'unsafe-inline'" in response.headers["Content-Security-Policy"].split("script-src")[1]


def test_an_unreachable_redis_is_503_with_the_headers(tmp_path: Path) -> None:
    settings = api_settings(tmp_path).model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "broker_url": "redis://127.0.0.1:1/0"}
    )
    with TestClient(create_api(settings), raise_server_exceptions=False) as client:
        for path in ("/api/v1/queues", "/dashboard", "/dashboard/dead"):
            response = client.get(path)
            assert response.status_code == 503, (path, response.text)
            assert response.headers["X-Content-Type-Options"] == "nosniff"
        page = client.get("/dashboard/dead")
        assert page.headers["Content-Security-Policy"] == PAGE_POLICY


class BrokenStore(StatsStore):
    """A store whose queue reading fails in a way no handler maps: the API answers 500."""

    def queues(self) -> list[dict[str, Any]]:
        raise RuntimeError("a bug")


def test_an_unexpected_error_is_500_with_nosniff(settings: Settings) -> None:
    from taskyard.monitoring.api.app import _resolve

    runtime: Runtime = _resolve(settings)[0]
    api = create_api(runtime, store=BrokenStore(runtime))
    with TestClient(api, raise_server_exceptions=False) as client:
        response = client.get("/api/v1/queues")
    assert response.status_code == 500 and response.json()["error"] == "internal_error"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
