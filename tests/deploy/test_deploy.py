"""deploy/: the KEDA ScaledObjects and the Grafana dashboard query metrics /metrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import redis
import yaml
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.monitoring.api.app import create_api
from tests.monitoring.api.test_api import api_settings, seed
from tests.monitoring.test_metrics import scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b((?:celery|taskyard)_[a-z_]+)\b")


def family_of(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


def exposed(tmp_path: Path, redis_client: redis.Redis) -> set[str]:
    settings: Settings = api_settings(tmp_path)
    seed(settings, redis_client)
    with TestClient(create_api(settings)) as client:
        return set(scrape(client))


def scaled_objects() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "keda").glob("*.yaml"))]


def test_one_scaled_object_per_worker_profile_on_its_own_queues() -> None:
    profiles = Settings().worker_profiles
    objects = scaled_objects()
    seen = {}
    for obj in objects:
        assert obj["apiVersion"] == "keda.sh/v1alpha1" and obj["kind"] == "ScaledObject"
        profile = obj["metadata"]["labels"]["taskyard.io/profile"]
        assert obj["spec"]["scaleTargetRef"]["name"] == f"taskyard-worker-{profile}"
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            queues = re.search(r'queue_name=~"([^"]+)"', query)
            assert queues, query
            assert queues.group(1).split("|") == profiles[profile], (profile, query)
            assert float(trigger["metadata"]["threshold"]) > 0
        seen[profile] = obj
    assert set(seen) == {"critical", "default", "batch"}
    # Urgent work never scales to zero.
    assert seen["critical"]["spec"]["minReplicaCount"] >= 1


def test_every_deployed_query_names_an_exposed_metric(
    tmp_path: Path, redis_client: redis.Redis
) -> None:
    have = exposed(tmp_path, redis_client)
    queries = [t["metadata"]["query"] for obj in scaled_objects() for t in obj["spec"]["triggers"]]
    dashboard = json.loads((DEPLOY / "grafana" / "taskyard-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        queries += [target["expr"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    for query in queries:
        names = METRIC.findall(query)
        assert names, query
        for name in names:
            assert family_of(name) in have, (name, query)


def test_grafana_dashboard_is_importable_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "taskyard-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "taskyard"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
