"""Users and roles on every route, sessions with CSRF, dashboard actions, the audit trail.

A real API on the suite's Redis: dead letters are recorded in its store, replays publish to its
broker, users and sessions live beside them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.deadletters import DeadLetter, RedisDeadLetterStore
from taskyard.keys import Keys
from taskyard.monitoring.api.access import SESSION_COOKIE
from taskyard.monitoring.api.app import _resolve, create_api
from taskyard.monitoring.api.audit import AuditLog
from taskyard.monitoring.api.users import Role, UserStore
from tests.monitoring.api.test_api import api_settings

TOKEN = "the-admin-token"
PASSWORD = "correct horse battery"
SECRET = "4111111111111111"


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path, api_token=TOKEN)


@pytest.fixture
def store(settings: Settings) -> RedisDeadLetterStore:
    runtime, _ = _resolve(settings)
    dead = RedisDeadLetterStore.for_runtime(runtime)
    now = time.time()
    for i in range(6):
        dead.record(
            DeadLetter(
                id=f"t{i}",
                reason="failed",
                name="shop.charge" if i < 4 else "shop.refund",
                queue="high",
                args=json.dumps([7, SECRET]),
                kwargs=json.dumps({"card_number": SECRET, "amount": 5}),
                exception_type="ValueError",
                exception="declined",
                headers={"taskyard_redact": {"a": [1]}},
                first_at=now - 60,
                last_at=now - 10 + i,
            )
        )
    return dead


@pytest.fixture
def users(redis_client: redis.Redis) -> dict[str, str]:
    """A user of each role; name -> API token."""
    store = UserStore(redis_client, Keys())
    tokens = {}
    for role in Role:
        store.add(role.label, role, PASSWORD)
        tokens[role.label] = store.issue_token(role.label)
    return tokens


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit(redis_client: redis.Redis) -> list[tuple[str, str, int, str]]:
    return [(e.actor, e.action, e.count, e.via) for e in AuditLog(redis_client, Keys()).recent()]


# --- without users: the loopback default -------------------------------------------------------
def test_without_users_reads_are_open_and_actions_need_the_admin_token(
    client: TestClient, store: RedisDeadLetterStore, redis_client: redis.Redis
) -> None:
    assert client.get("/api/v1/dead").status_code == 200
    assert client.get("/dashboard/dead").status_code == 200
    body = {"ids": ["t0"]}
    assert client.post("/api/v1/dead/replay", json=body).status_code == 401
    done = client.post("/api/v1/dead/replay", json=body, headers=bearer(TOKEN))
    assert done.status_code == 200, done.text
    assert audit(redis_client) == [("admin-token", "dead.replay", 1, "api")]


# --- with users ---------------------------------------------------------------------------------
def test_with_users_nothing_but_health_login_and_metrics_answers_anonymously(
    client: TestClient, users: dict[str, str], store: RedisDeadLetterStore
) -> None:
    for path in ("/api/v1/queues", "/api/v1/dead", "/api/v1/dead/t0", "/api/v1/tasks/t0"):
        answer = client.get(path)
        assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith(
            "Bearer"
        ), path
    page = client.get("/dashboard/dead?reason=failed", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/dashboard/dead%3Freason%3Dfailed"
    for path in ("/health/live", "/login", "/metrics", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/v1/queues", headers=bearer("tyu_nobody")).status_code == 403


def test_metrics_can_need_credentials_too(
    tmp_path: Path, redis_client: redis.Redis, users: dict[str, str]
) -> None:
    settings = api_settings(tmp_path, metrics_public=False)
    with TestClient(create_api(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(users["viewer"])).status_code == 200


def test_each_role_on_each_action(
    client: TestClient,
    users: dict[str, str],
    store: RedisDeadLetterStore,
    redis_client: redis.Redis,
) -> None:
    allowed = {
        ("viewer", "replay"): False,
        ("viewer", "purge"): False,
        ("operator", "replay"): True,
        ("operator", "purge"): False,
        ("admin", "replay"): True,
        ("admin", "purge"): True,
    }
    ids = iter(f"t{i}" for i in range(6))
    for (role, action), ok in allowed.items():
        answer = client.post(
            f"/api/v1/dead/{action}", json={"ids": [next(ids)]}, headers=bearer(users[role])
        )
        assert answer.status_code == (200 if ok else 403), (role, action, answer.text)
        if not ok:
            assert f"needs {'admin' if action == 'purge' else 'operator'}" in answer.text
    for role, ok in (("viewer", False), ("operator", False), ("admin", True)):
        answer = client.get("/api/v1/audit", headers=bearer(users[role]))
        assert answer.status_code == (200 if ok else 403), role
    actions = [(actor, action) for actor, action, _, _ in audit(redis_client)]
    assert actions == [
        ("admin", "dead.purge"),
        ("admin", "dead.replay"),
        ("operator", "dead.replay"),
    ]
    operator_maintenance = client.post(
        "/api/v1/admin/maintenance/run", headers=bearer(users["operator"])
    )
    assert operator_maintenance.status_code == 202
    assert (
        client.post("/api/v1/admin/maintenance/run", headers=bearer(users["viewer"])).status_code
        == 403
    )


def test_arguments_are_redacted_and_withheld_from_viewers(
    client: TestClient, users: dict[str, str], store: RedisDeadLetterStore
) -> None:
    for role in ("viewer", "operator", "admin"):
        for path in (
            "/api/v1/dead",
            "/api/v1/dead/t0",
            "/api/v1/tasks/t0",
            "/dashboard/dead",
            "/dashboard/task/t0",
        ):
            answer = client.get(path, headers=bearer(users[role]))
            assert answer.status_code == 200, (role, path)
            assert SECRET not in answer.text, (role, path)
    entry = client.get("/api/v1/dead/t0", headers=bearer(users["operator"])).json()
    assert json.loads(entry["args"]) == [7, "[redacted]"]
    assert json.loads(entry["kwargs"]) == {"card_number": "[redacted]", "amount": 5}
    seen_by_viewer = client.get("/api/v1/dead/t0", headers=bearer(users["viewer"])).json()
    assert json.loads(seen_by_viewer["args"]) == ["[redacted]"]
    # The stored entry keeps the values: a replay sends them.
    stored = store.get("t0")
    assert stored is not None and SECRET in stored.args


# --- the browser's way: login, session, CSRF-checked forms --------------------------------------
def log_in(client: TestClient, name: str) -> str:
    answer = client.post(
        "/login",
        data={"username": name, "password": PASSWORD, "next": "/dashboard/dead"},
        follow_redirects=False,
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/dashboard/dead"
    cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/dashboard/dead")
    assert page.status_code == 200 and f"{name} (" in page.text
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    return found.group(1) if found else ""


def test_a_removed_token_is_refused_within_the_credential_cache(
    client: TestClient, users: dict[str, str], redis_client: redis.Redis
) -> None:
    """Answers about a token are reused for CREDENTIALS_CHECK_S (no Redis call per request);
    a user removed elsewhere (the CLI, another API process) is refused once that lapses."""
    from taskyard.monitoring.api.access import CREDENTIALS_CHECK_S

    token = users["operator"]
    assert client.get("/api/v1/dead", headers=bearer(token)).status_code == 200
    UserStore(redis_client, Keys()).remove("operator")
    deadline = time.monotonic() + CREDENTIALS_CHECK_S + 10
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = client.get("/api/v1/dead", headers=bearer(token)).status_code
        time.sleep(0.05)
    assert status == 403
    # Made-up tokens are refused alike and cannot grow the cache without bound.
    for i in range(50):
        assert client.get("/api/v1/dead", headers=bearer(f"tyu_{i}")).status_code == 403


def test_login_refuses_wrong_credentials_alike(client: TestClient, users: dict[str, str]) -> None:
    for name, password in (("admin", "wrong password!"), ("nobody", PASSWORD)):
        answer = client.post("/login", data={"username": name, "password": password})
        assert answer.status_code == 401 and "wrong name or password" in answer.text
    assert SESSION_COOKIE not in client.cookies
    # Never sends the browser to another site after login.
    answer = client.post(
        "/login",
        data={"username": "viewer", "password": PASSWORD, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/dashboard"


def test_dashboard_replay_by_filter_counts_confirms_and_audits(
    client: TestClient,
    users: dict[str, str],
    store: RedisDeadLetterStore,
    redis_client: redis.Redis,
) -> None:
    csrf = log_in(client, "operator")
    assert csrf, "an operator's page carries the forms"
    form = {"op": "replay", "name": "shop.charge", "csrf_token": csrf}
    # A form from elsewhere has no token: refused, nothing replayed.
    forged = client.post(
        "/dashboard/dead/action", data={**form, "csrf_token": "", "confirm": "yes"}
    )
    assert forged.status_code == 403
    step = client.post("/dashboard/dead/action", data=form)
    assert step.status_code == 200 and "Replay 4 dead letter(s)?" in step.text
    done = client.post(
        "/dashboard/dead/action", data={**form, "confirm": "yes"}, follow_redirects=False
    )
    assert done.status_code == 303, done.text
    assert store.count() == 2  # the four charges replayed, the refunds still dead
    assert audit(redis_client)[0] == ("operator", "dead.replay", 4, "dashboard")
    # The redirect carries a token; the page shows what was done to the user who did it.
    location = done.headers["location"]
    assert "replayed" not in location
    assert "replayed 4 of 4 dead letter(s)" in client.get(location).text
    # A link made elsewhere cannot put its own words on the page.
    crafted = client.get("/dashboard/dead?done=Session+expired:+log+in+at+evil.example")
    assert crafted.status_code == 200 and "evil.example" not in crafted.text
    assert 'class="done"' not in crafted.text
    # Nor is one user's notice shown to another.
    client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    log_in(client, "viewer")
    assert "replayed 4 of 4" not in client.get(location).text
    form["csrf_token"] = log_in(client, "operator")
    # An operator may not purge, whatever the form says.
    purge = client.post("/dashboard/dead/action", data={**form, "op": "purge", "confirm": "yes"})
    assert purge.status_code == 403


def test_viewer_pages_have_no_forms_and_admin_purges_selected(
    client: TestClient,
    users: dict[str, str],
    store: RedisDeadLetterStore,
    redis_client: redis.Redis,
) -> None:
    assert log_in(client, "viewer") == ""
    client.cookies.clear()
    csrf = log_in(client, "admin")
    answer = client.post(
        "/dashboard/dead/action",
        data={"op": "purge", "ids": ["t4", "t5"], "csrf_token": csrf, "confirm": "yes"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert store.get("t4") is None and store.get("t5") is None and store.count() == 4
    assert audit(redis_client)[0][:3] == ("admin", "dead.purge", 2)
    audit_page = client.get("/dashboard/audit")
    assert audit_page.status_code == 200 and "dead.purge" in audit_page.text


def test_logout_needs_the_token_and_ends_the_session(
    client: TestClient, users: dict[str, str]
) -> None:
    csrf = log_in(client, "admin")
    assert client.post("/logout", data={"csrf_token": "x"}).status_code == 403
    assert (
        client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    )
    client.cookies.clear()
    assert client.get("/dashboard", follow_redirects=False).status_code == 303
