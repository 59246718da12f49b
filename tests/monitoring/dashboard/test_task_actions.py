"""Cancelling from the console: one task from its page, waiting tasks by filter from the tasks
page (count, confirm), the task search and the task-name filter; roles, CSRF and the audit trail.

A real API on the suite's Redis; tasks are published to its queues by a test app and no worker
runs, so each stays waiting until cancelled.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.config import Settings
from taskyard.keys import Keys
from taskyard.monitoring.api.access import SESSION_COOKIE
from taskyard.monitoring.api.app import create_api
from taskyard.monitoring.api.users import Role, UserStore
from tests.monitoring.api.test_access import PASSWORD, audit, log_in
from tests.monitoring.api.test_api import api_settings, seed
from tests.monitoring.dashboard.test_templates import HOSTILE, RAW

KEYS = Keys()


@pytest.fixture
def settings(tmp_path: Path, redis_client: redis.Redis) -> Settings:
    return api_settings(tmp_path)


@pytest.fixture
def users(redis_client: redis.Redis) -> None:
    store = UserStore(redis_client, KEYS)
    for role in Role:
        store.add(role.label, role, PASSWORD)


@pytest.fixture
def client(settings: Settings, users: None) -> Iterator[TestClient]:
    with TestClient(create_api(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def cancelled(redis_client: redis.Redis) -> set[str]:
    """Ids with a cancel record."""
    return {i.decode() for i in redis_client.zrange(KEYS.cancel_index(), 0, -1)}


def session_csrf(client: TestClient, redis_client: redis.Redis) -> str:
    """The CSRF token of the client's session (a viewer's pages carry none)."""
    principal = UserStore(redis_client, KEYS).session(client.cookies[SESSION_COOKIE])
    assert principal is not None and principal.csrf
    return principal.csrf


def test_operator_cancels_a_waiting_task_from_its_page(
    client: TestClient, make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    waiting = jobs.record.delay(1).id
    csrf = log_in(client, "operator")
    page = client.get(f"/dashboard/task/{waiting}")
    assert page.status_code == 200 and 'id="cancel-task"' in page.text
    assert f'action="/dashboard/task/{waiting}/cancel"' in page.text
    assert f'name="csrf_token" value="{csrf}"' in page.text
    url = f"/dashboard/task/{waiting}/cancel"
    # A form from elsewhere carries no token, or a wrong one: refused, nothing cancelled.
    for token in ("", "forged"):
        assert client.post(url, data={"csrf_token": token}).status_code == 403
    assert client.post(url, data={"terminate": "yes"}).status_code == 403
    assert cancelled(redis_client) == set()
    assert client.post(url, data={"csrf_token": csrf, "grace_s": "-1"}).status_code == 422
    done = client.post(
        url, data={"csrf_token": csrf, "terminate": "yes", "grace_s": "5"}, follow_redirects=False
    )
    assert done.status_code == 303 and done.headers["location"] == f"/dashboard/task/{waiting}"
    assert cancelled(redis_client) == {waiting}
    record = client.get(f"/api/v1/tasks/{waiting}").json()["cancel"]
    assert record["by"] == "dashboard:operator" and record["terminate"] is True
    assert record["grace_s"] == 5.0
    assert audit(redis_client)[0] == ("operator", "tasks.cancel", 1, "dashboard")
    entry = client.get("/dashboard/task/" + waiting)
    assert 'id="task-cancel"' in entry.text and "by dashboard:operator" in entry.text


def test_a_viewer_sees_no_form_and_may_not_cancel(
    client: TestClient, make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    waiting = jobs.record.delay(2).id
    assert log_in(client, "viewer") == ""
    page = client.get(f"/dashboard/task/{waiting}")
    assert page.status_code == 200 and 'id="cancel-task"' not in page.text
    assert 'id="cancel-waiting"' not in client.get("/dashboard/tasks").text
    # Even with the session's own token the role is checked.
    csrf = session_csrf(client, redis_client)
    one = client.post(f"/dashboard/task/{waiting}/cancel", data={"csrf_token": csrf})
    assert one.status_code == 403 and "needs operator" in one.text
    many = client.post(
        "/dashboard/tasks/cancel", data={"csrf_token": csrf, "name": "*", "confirm": "yes"}
    )
    assert many.status_code == 403
    assert cancelled(redis_client) == set() and audit(redis_client)[0][1] == "session.login"


def test_bulk_cancel_counts_confirms_and_cancels_exactly_the_matches(
    client: TestClient, make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    records = set(jobs.record.delay_many((i,) for i in range(3)))
    others = {jobs.noop.delay(i).id for i in range(2)}
    csrf = log_in(client, "operator")
    assert 'id="cancel-waiting"' in client.get("/dashboard/tasks").text
    form = {"csrf_token": csrf, "name": "*.record", "queue": "normal"}
    forged = client.post(
        "/dashboard/tasks/cancel", data={**form, "csrf_token": "", "confirm": "yes"}
    )
    assert forged.status_code == 403 and cancelled(redis_client) == set()
    step = client.post("/dashboard/tasks/cancel", data=form)
    assert step.status_code == 200 and "Cancel 3 waiting task(s)?" in step.text
    assert all(task_id in step.text for task_id in records)
    assert cancelled(redis_client) == set(), "the first submit only counts"
    done = client.post(
        "/dashboard/tasks/cancel", data={**form, "confirm": "yes"}, follow_redirects=False
    )
    assert done.status_code == 303, done.text
    assert cancelled(redis_client) == records and not others & cancelled(redis_client)
    assert audit(redis_client)[0] == ("operator", "tasks.cancel", 3, "dashboard")
    page = client.get(done.headers["location"])
    assert "cancelled 3 of 3 waiting task(s) matching name=*.record queue=normal" in page.text
    # Nothing matches any more but the same three (already cancelled): counted, none new.
    again = client.post("/dashboard/tasks/cancel", data={**form, "name": "*.nothing"})
    assert "Cancel 0 waiting task(s)?" in again.text and 'id="confirm"' not in again.text


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({}, "matches every waiting task"),
        ({"name": " * ", "older_than_s": "0"}, "matches every waiting task"),
        ({"older_than_s": "soon"}, "expected seconds"),
        ({"name": "x", "older_than_s": "nan"}, "expected seconds"),
    ],
)
def test_a_filter_that_narrows_nothing_is_refused(
    client: TestClient,
    make_app: Any,
    redis_client: redis.Redis,
    fields: dict[str, str],
    said: str,
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    jobs.record.delay(1)
    csrf = log_in(client, "operator")
    for confirm in ("", "yes"):
        answer = client.post(
            "/dashboard/tasks/cancel", data={"csrf_token": csrf, "confirm": confirm, **fields}
        )
        assert answer.status_code == 400 and said in answer.text
        assert 'id="confirm"' not in answer.text
    assert cancelled(redis_client) == set()


def test_search_and_the_task_name_filter(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    seed(settings, redis_client)
    log_in(client, "viewer")
    found = client.get(
        "/dashboard/tasks", params={"task": " 5f0c-4a:b.c@d "}, follow_redirects=False
    )
    assert found.status_code == 303
    assert found.headers["location"] == "/dashboard/task/5f0c-4a%3Ab.c%40d"
    for bad in (HOSTILE, "a/b", "x" * 5000):
        answer = client.get("/dashboard/tasks", params={"task": bad})
        assert answer.status_code == 400 and "Not a task id" in answer.text
        assert all(raw not in answer.text for raw in RAW)
        assert "x" * 100 not in answer.text, "a long value is cut"
    table = client.get("/dashboard/tasks", params={"name": "ADD"}).text
    names = table.split('id="task-names"')[1]
    assert "app.add" in names and "app.fail" not in names
    by_queue = client.get("/dashboard/tasks", params={"queue": "high"}).text
    assert "app.fail" in by_queue.split('id="task-names"')[1]
    assert "app.add" not in by_queue.split('id="task-names"')[1]
    hostile = client.get("/dashboard/tasks", params={"name": HOSTILE, "queue": HOSTILE}).text
    assert all(raw not in hostile for raw in RAW) and "no task name matches" in hostile
    assert re.search(r'name="name" value="&lt;script&gt;', hostile)
