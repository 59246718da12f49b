"""Job control through real `celery worker` processes: exactly one run of a unique task, a
SIGKILLed worker's lock freed within the lease, debounce, cancellation wherever the task is
(queued, delayed, reserved, running, sent while every worker was down, by name), progress seen
through the API while the task runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from taskyard.keys import Keys
from taskyard.testing import ROOT, celery_worker, child_env, run_python, wait_until
from tests.apps import jobs as jobs_app

pytestmark = pytest.mark.slow

APP = "tests.apps.jobs"
KEYS = Keys()
BASE = {"TASKYARD_GUARD__ENABLED": "false"}


def _env(redis_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**redis_env, **BASE, **extra}


def _runs(client: redis.Redis, event: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in client.lrange(jobs_app.RUNS, 0, -1)]
    return [r for r in rows if event is None or r["event"] == event]


def _send(env: dict[str, str], expr: str) -> Any:
    """Send from a fresh producer process; returns what ``expr`` evaluates to (an id)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import json\nfrom tests.apps import jobs\nprint(json.dumps({expr}))",
        ],
        env=child_env(env),
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cancel(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "taskyard.cli", "cancel", "-A", APP, *args],
        env=child_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _record(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    raw = client.hget(KEYS.cancel_info(), task_id)
    return json.loads(raw) if raw else None


def test_many_producers_one_run(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    code = (
        "import redis\nfrom tests.apps import jobs\n"
        f"c = redis.Redis.from_url({env['TASKYARD_REDIS_URL']!r})\n"
        "c.rpush('test:ids', *[jobs.once.delay('same', 2.0).id for _ in range(500)])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=child_env(env), cwd=ROOT)
        for _ in range(8)
    ]
    # No worker yet: sending takes a while on a loaded machine, and each run that finished
    # would rightly let the next call publish again.
    for proc in procs:
        assert proc.wait(300) == 0
    ids = [raw.decode() for raw in redis_client.lrange("test:ids", 0, -1)]
    assert len(ids) == 4000 and len(set(ids)) == 1
    assert redis_client.llen("normal") == 1
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2):
        wait_until(lambda: _runs(redis_client, "once"), 60, 0.1, "the unique task to run")
        time.sleep(3.0)  # longer than the task: a second message would have started by now
    runs = _runs(redis_client, "once")
    assert [r["id"] for r in runs] == ids[:1]


def test_sigkilled_worker_frees_the_lock_within_the_lease(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    lease = 3.0
    env = _env(redis_env, TASKYARD_RESERVATION_LEASE_S=str(lease))
    first = _send(env, "jobs.once.delay('k', 600).id")
    with celery_worker(APP, "normal", env, tmp_path, concurrency=1, name="doomed") as worker:
        wait_until(lambda: _runs(redis_client, "once"), 60, 0.1, "the task to start")
        assert _send(env, "jobs.once.delay('k', 600).deduplicated") is True
        worker.kill()
    killed_at = time.monotonic()
    code = (
        "import time\nfrom tests.apps import jobs\n"
        "while True:\n"
        "    r = jobs.once.delay('k', 0.1)\n"
        "    if not r.deduplicated:\n"
        "        print(r.id); break\n"
        "    time.sleep(0.1)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=lease * 10 + 60,
        check=True,
    )
    freed_after = time.monotonic() - killed_at
    second = out.stdout.strip().splitlines()[-1]
    assert second != first
    # Within the lease (plus slack for a loaded machine), not the day-long unique TTL.
    assert freed_after < lease * 10 + 30
    # Two processes: the killed run's message comes back too (at least once) and holds one.
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2, name="next"):
        wait_until(
            lambda: any(r["id"] == second for r in _runs(redis_client, "once")),
            60,
            0.1,
            "the new call to run",
        )


def test_debounce_runs_once_with_the_last_arguments(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=1):
        run_python(
            env,
            "import time, redis\nfrom tests.apps import jobs\n"
            f"c = redis.Redis.from_url({env['TASKYARD_REDIS_URL']!r})\n"
            "for v in range(5):\n"
            "    jobs.debounced.delay('k', v); time.sleep(0.2)\n"
            "c.set('test:last_call', time.time())\n",
        )
        wait_until(lambda: _runs(redis_client, "debounced"), 60, 0.1, "the debounced run")
        time.sleep(2.0)
    runs = _runs(redis_client, "debounced")
    assert [r["value"] for r in runs] == [4]
    # It ran after the last call's delay, not after the first call's.
    assert runs[0]["at"] >= float(redis_client.get("test:last_call") or 0) + 1.0


def test_cancel_sent_while_every_worker_was_down(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    doomed = _send(env, "jobs.record.delay(1).id")
    delayed = _send(env, "jobs.record.apply_async((2,), countdown=2).id")
    out = _cancel(env, doomed, delayed)
    assert "cancelled 2 task(s)" in out
    marker = _send(env, "jobs.record.apply_async((3,), countdown=3).id")
    with celery_worker(APP, "normal", env, tmp_path, concurrency=1):
        wait_until(
            lambda: any(r["id"] == marker for r in _runs(redis_client, "record")),
            60,
            0.1,
            "the marker (sent after both) to run",
        )
    assert [r["i"] for r in _runs(redis_client, "record")] == [3]
    for task_id in (doomed, delayed):
        record = _record(redis_client, task_id)
        assert record is not None and record["outcome"] == "dropped" and record["by"] == "cli"


def test_cancel_queued_and_reserved(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with celery_worker(
        APP, "normal", env, tmp_path, concurrency=1, extra=("--prefetch-multiplier", "4")
    ):
        # Producer processes start slowly on a loaded machine: one sends them all, the blocker
        # first, and it runs long enough for the cancel command to arrive while it runs.
        blocker, *ids = _send(
            env, "[jobs.stubborn.delay(25).id] + [jobs.record.delay(i).id for i in range(8)]"
        )
        wait_until(lambda: _runs(redis_client, "started"), 60, 0.1, "the blocker to start")
        # Prefetch 4: some are reserved by the busy worker, the rest wait in the queue.
        wait_until(lambda: redis_client.hlen("unacked") >= 2, 30, 0.05, "reservations")
        cancelled = ids[1::2]
        held = {json.loads(raw)[0]["headers"]["id"] for raw in redis_client.hvals("unacked")}
        _cancel(env, *cancelled)
        assert not _runs(redis_client, "finished")  # the blocker still runs: nothing started
        assert held & set(cancelled)  # one cancelled message was reserved by the worker
        wait_until(
            lambda: (
                len(_runs(redis_client, "record")) >= 4
                and all(_record(redis_client, i).get("outcome") for i in cancelled)
            ),  # type: ignore[union-attr]
            60,
            0.1,
            "the others to run and the cancels to take effect",
        )
        time.sleep(1.0)
    ran = {r["id"] for r in _runs(redis_client, "record")}
    assert ran == set(ids[0::2])
    outcomes = {_record(redis_client, i)["outcome"] for i in cancelled}  # type: ignore[index]
    assert outcomes <= {"dropped", "skipped"}
    assert blocker not in cancelled


def test_cancel_running_cooperative_with_progress_through_the_api(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    from taskyard.config import load_settings
    from taskyard.monitoring.api.app import create_api

    env = _env(redis_env)
    settings = load_settings(
        redis_url=env["TASKYARD_REDIS_URL"],
        database_url=f"sqlite:///{tmp_path / 'history.db'}",
        monitoring={"api_cache_s": 0.0, "api_token": "t0ken"},
    )
    with (
        celery_worker(APP, "normal", env, tmp_path, concurrency=1),
        TestClient(create_api(settings), raise_server_exceptions=False) as api,
    ):
        task_id = _send(env, "jobs.cooperative.delay(600, 0.1).id")
        wait_until(lambda: _runs(redis_client, "started"), 60, 0.1, "the task to start")

        def progress() -> dict[str, Any] | None:
            body = api.get(f"/api/v1/tasks/{task_id}").json()
            return body.get("progress") if isinstance(body, dict) else None

        wait_until(lambda: (progress() or {}).get("done", 0) >= 3, 30, 0.2, "progress")
        first = progress()
        assert first is not None and first["total"] == 600
        assert first["detail"].startswith("step ")
        assert api.post(f"/api/v1/tasks/{task_id}/cancel").status_code in (401, 403)
        response = api.post(
            f"/api/v1/tasks/{task_id}/cancel", headers={"Authorization": "Bearer t0ken"}
        )
        assert response.status_code == 200, response.text
        wait_until(lambda: _runs(redis_client, "stopped"), 30, 0.1, "the task to stop")
        wait_until(
            lambda: (_record(redis_client, task_id) or {}).get("outcome") == "stopped",
            30,
            0.1,
            "the outcome",
        )
        body = api.get(f"/api/v1/tasks/{task_id}").json()
        assert body["state"] == "cancelled"
        assert body["cancel"]["by"] == "api:admin-token"
        assert any(e["event"] == "cancelled" for e in body["events"])
    assert not _runs(redis_client, "finished")


def test_cancel_running_with_terminate(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=1) as worker:
        task_id = _send(env, "jobs.stubborn.delay(120).id")
        wait_until(lambda: _runs(redis_client, "started"), 60, 0.1, "the task to start")
        child = _runs(redis_client, "started")[0]["pid"]
        _cancel(env, task_id, "--terminate", "--grace", "1")
        wait_until(
            lambda: (_record(redis_client, task_id) or {}).get("outcome") == "terminated",
            60,
            0.1,
            "the task to be terminated",
        )
        wait_until(lambda: child not in worker.children(), 30, 0.1, "the child to die")
        # The pool replaced the child: the worker runs the next task.
        after = _send(env, "jobs.record.delay(1).id")
        wait_until(
            lambda: any(r["id"] == after for r in _runs(redis_client, "record")),
            60,
            0.1,
            "the next task to run",
        )
    assert not _runs(redis_client, "finished")
    assert redis_client.llen("normal") == 0  # not requeued, not retried


def test_bulk_cancel_by_name(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    run_python(
        env,
        "from tests.apps import jobs\n"
        "jobs.record.delay_many((i,) for i in range(20))\n"
        "jobs.noop.delay_many((i,) for i in range(5))\n",
    )
    out = _cancel(env, "--name", "*.record", "--queue", "normal", "--yes")
    assert "20 task(s) match" in out and "cancelled 20 task(s)" in out
    with celery_worker(APP, "normal", env, tmp_path, concurrency=2):
        marker = _send(env, "jobs.queued_only.delay('m').id")
        wait_until(
            lambda: any(r["id"] == marker for r in _runs(redis_client)),
            60,
            0.1,
            "the marker to run",
        )
    assert not _runs(redis_client, "record")
    assert redis_client.llen("normal") == 0


def test_terminate_on_the_solo_pool_kills_nothing(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    """The solo pool (and `fast` solo processes) run the task in the worker itself: --terminate
    cannot end one task there, so the task runs on, the worker survives and says why."""
    env = _env(redis_env)
    with celery_worker(APP, "normal", env, tmp_path, concurrency=1, pool="solo") as worker:
        task_id, queued = _send(env, "[jobs.stubborn.delay(15).id, jobs.record.delay(1).id]")
        wait_until(lambda: _runs(redis_client, "started"), 60, 0.1, "the task to start")
        _cancel(env, task_id, queued, "--terminate", "--grace", "0.5")
        wait_until(lambda: _runs(redis_client, "finished"), 60, 0.1, "the task to finish")
        wait_until(
            lambda: "cannot kill one task" in worker.output(), 30, 0.1, "the worker's warning"
        )
        assert worker.process.poll() is None
        marker = _send(env, "jobs.record.delay(2).id")
        wait_until(
            lambda: any(r["id"] == marker for r in _runs(redis_client, "record")),
            60,
            0.1,
            "the worker to go on",
        )
    # The message queued behind it was cancelled too and never started.
    assert [r["i"] for r in _runs(redis_client, "record")] == [2]
