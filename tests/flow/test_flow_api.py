"""Flow control through the stats API (admin token) and in /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.monitoring.api.app import create_api
from tests.monitoring.api.test_api import TOKEN, api_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = api_settings(tmp_path, api_token=TOKEN)
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_flow_routes_need_the_admin_token(client: TestClient) -> None:
    assert client.get("/api/v1/admin/flow").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (
        client.post("/api/v1/admin/flow/pause", json={"queue": "low"}, headers=wrong).status_code
        == 403
    )


def test_limits_and_pauses_through_the_api(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post(
        "/api/v1/admin/flow/limits/app.sync",
        json={"rate": "10/s", "concurrency": 3, "weights": {"acme": 2}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    limits = response.json()["detail"]["limits"]
    assert limits[0]["task"] == "app.sync" and limits[0]["rate"] == "10/s"
    assert limits[0]["concurrency"] == 3 and limits[0]["source"] == "runtime"
    bad = client.post("/api/v1/admin/flow/limits/app.sync", json={"rate": "fast"}, headers=AUTH)
    assert bad.status_code == 422 and "N/s" in bad.text

    for key in ("deploy", "ops"):
        assert (
            client.post(
                "/api/v1/admin/flow/pause", json={"queue": "low", "key": key}, headers=AUTH
            ).status_code
            == 200
        )
    shown = client.get("/api/v1/admin/flow", headers=AUTH).json()
    assert shown["paused"][0]["name"] == "low"
    assert sorted(shown["paused"][0]["keys"]) == ["deploy", "ops"]

    metrics = client.get("/metrics").text
    assert 'taskyard_flow_limit{kind="rate_per_second",name="app.sync"} 10.0' in metrics
    assert 'taskyard_flow_limit{kind="concurrency",name="app.sync"} 3.0' in metrics
    assert 'taskyard_flow_paused{kind="queue",name="low"} 2.0' in metrics

    resumed = client.post(
        "/api/v1/admin/flow/resume", json={"queue": "low", "all_keys": True}, headers=AUTH
    )
    assert resumed.json()["detail"]["paused"] == []
    reset = client.post("/api/v1/admin/flow/limits/app.sync/reset", headers=AUTH)
    assert reset.json()["detail"]["limits"] == []


def test_flow_alert_rules_pass_promtool() -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing (scripts/ensure-prometheus.sh installs it)")
    rules = (
        Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "taskyard-flow-rules.yml"
    )
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rules found" in out.stdout
