"""A revoked task shows as such in its timeline and in `taskyard task ID` (issue 18 item 12).

Celery's revoke on a taskyard app is durable (job control, docs/jobs.md): the fetch drops the
message before any worker runs it, and the timeline ends at ``cancelled``; a worker that
discards a revoked message itself records ``revoked``. Either way it never looks stuck."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from taskyard.monitoring import timeline
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, child_env, wait_until
from tests import servers
from tests.apps import dead as dead_app


def test_a_revoked_task_is_revoked_in_its_timeline_and_the_cli(
    make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    runtime = runtime_of(app)
    task_id = str(uuid.uuid4())
    with celery_worker("tests.apps.dead", "normal", redis_env, tmp_path, concurrency=1):
        # The worker keeps the revoked id; the task arriving afterwards is discarded. A broadcast
        # sent before the worker's remote-control consumer listens is not heard (pub/sub keeps
        # nothing), so it is sent again until the worker answers (a revoke is idempotent).
        def answered() -> bool:
            return bool(app.control.revoke(task_id, reply=True, timeout=2))

        wait_until(answered, 60, 0.5, "the worker to answer the revoke")
        dead_app.ok.apply_async(("revoked",), task_id=task_id)
        dead_app.ok.delay("after")
        wait_until(
            lambda: b"ok-after" in redis_client.lrange(dead_app.RAN, 0, -1), 60, 0.2, "a later task"
        )

        def ended() -> bool:
            found = timeline.with_job_state(
                runtime, task_id, timeline.lookup(runtime, None, task_id)
            )
            return (found or {}).get("state") in ("revoked", "cancelled")

        wait_until(ended, 60, 0.2, "the revoked or cancelled step in the timeline")
    assert b"ok-revoked" not in redis_client.lrange(dead_app.RAN, 0, -1)
    shown = subprocess.run(
        [sys.executable, "-m", "taskyard.cli", "task", task_id],
        env=child_env(
            {
                "TASKYARD_REDIS_URL": servers.REDIS_URL,
                "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'h.db'}",
            }
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "state=cancelled" in shown.stdout or "state=revoked" in shown.stdout, (
        shown.stdout + shown.stderr
    )


def test_summarize_ends_a_revoked_timeline_at_revoked() -> None:
    events = [
        {"at": 1.0, "event": "sent", "name": "t", "queue": "normal", "worker": "", "detail": ""},
        {"at": 2.0, "event": "received", "name": "t", "queue": "normal", "worker": "w"},
        {"at": 3.0, "event": "revoked", "name": "t", "queue": "normal", "worker": "w"},
    ]
    summary = timeline.summarize("id", events)
    assert summary["state"] == "revoked" and summary["counts"]["revoked"] == 1
