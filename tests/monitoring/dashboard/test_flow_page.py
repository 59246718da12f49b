"""The flow page: limits, pauses and held messages; an operator pauses, resumes and sets limits
through CSRF-checked forms, each in the audit trail."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.keys import Keys
from taskyard.monitoring.api.app import _resolve, create_api
from taskyard.monitoring.api.audit import AuditLog
from taskyard.monitoring.api.users import Role, UserStore
from tests.monitoring.api.test_api import api_settings

PASSWORD = "correct horse battery"


@pytest.fixture
def client(tmp_path: Path, redis_client: redis.Redis) -> Iterator[TestClient]:
    UserStore(redis_client, Keys()).add("ops", Role.OPERATOR, PASSWORD)
    UserStore(redis_client, Keys()).add("eve", Role.VIEWER, PASSWORD)
    with TestClient(create_api(api_settings(tmp_path)), raise_server_exceptions=False) as c:
        yield c


def _login(client: TestClient, name: str) -> str:
    client.post("/login", data={"username": name, "password": PASSWORD})
    page = client.get("/dashboard/flow")
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    return found.group(1) if found else ""


def test_an_operator_pauses_resumes_and_sets_limits(
    client: TestClient, redis_client: redis.Redis, tmp_path: Path
) -> None:
    from taskyard.flow import store_for

    csrf = _login(client, "ops")
    assert csrf
    step = client.post(
        "/dashboard/flow/action",
        data={"op": "pause", "queue": "low", "key": "<deploy>", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert step.status_code == 303
    page = client.get("/dashboard/flow")
    assert "&lt;deploy&gt;" in page.text and "<deploy>" not in page.text
    runtime, app = _resolve(api_settings(tmp_path))
    store = store_for(runtime, app)
    assert [p["name"] for p in store.pauses()] == ["low"]
    client.post(
        "/dashboard/flow/action",
        data={
            "op": "limits",
            "task": "bdc.sync",
            "rate": "5/s",
            "concurrency": "2",
            "csrf_token": csrf,
        },
    )
    assert [(lim.task, lim.concurrency) for lim in store.limits()] == [("bdc.sync", 2)]
    client.post(
        "/dashboard/flow/action",
        data={"op": "resume", "queue": "low", "key": "<deploy>", "csrf_token": csrf},
    )
    assert store.pauses() == []
    forged = client.post("/dashboard/flow/action", data={"op": "pause", "queue": "high"})
    assert forged.status_code == 403 and store.pauses() == []
    actions = [e.action for e in AuditLog(redis_client, Keys()).recent(10)]
    assert actions[:3] == ["flow.resume", "flow.limits", "flow.pause"]


def test_a_viewer_sees_the_page_without_forms_and_cannot_act(client: TestClient) -> None:
    assert _login(client, "eve") == ""
    refused = client.post("/dashboard/flow/action", data={"op": "pause", "queue": "low"})
    assert refused.status_code == 403
