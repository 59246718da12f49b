"""The lean execution path (taskyard.workers.lean) in real solo-pool workers, and its seams."""

from __future__ import annotations

import inspect
import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.concurrency.solo import TaskPool as SoloPool
from celery.events.dispatcher import EventDispatcher
from celery.worker import state as worker_state
from celery.worker.consumer.consumer import Consumer
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from taskyard.deadletters import Query, RedisDeadLetterStore
from taskyard.routing.task import TaskyardTask
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, run_python, wait_until
from taskyard.workers import lean
from tests import servers
from tests.apps import lean as lean_app

APP = "tests.apps.lean"
QUEUES = "critical,high,normal,low,batch"
LEASE_S, SWEEP_S = 2.0, 1


def _env(redis_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **redis_env,
        "TASKYARD_RESULT_BACKEND": servers.REDIS_URL,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_RESERVATION_LEASE_S": str(LEASE_S),
        "TASKYARD_UNACKED_RESTORE_INTERVAL_S": str(SWEEP_S),
        **extra,
    }


def _solo(env: dict[str, str], tmp_path: Path, name: str = "lean") -> Any:
    """One solo-pool worker on every queue: what each process of the fast profile runs."""
    return celery_worker(APP, QUEUES, env, tmp_path, concurrency=1, pool="solo", name=name)


def _seen(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.lrange(lean_app.SEEN, 0, -1)]


def _of(client: redis.Redis, kind: str, task_id: str | None = None) -> list[dict[str, Any]]:
    return [
        r for r in _seen(client) if r["kind"] == kind and (task_id is None or r["id"] == task_id)
    ]


def _attempts(client: redis.Redis, key: str) -> int:
    return int(client.hget(lean_app.ATTEMPTS, key) or 0)


def _send(env: dict[str, str], code: str) -> None:
    run_python(env, f"from tests.apps import lean\n{code}")


# --- the seams ---------------------------------------------------------------------------------
def test_celery_seams_the_lean_path_relies_on() -> None:
    assert TaskyardTask.Strategy == "taskyard.workers.lean:strategy"
    assert "self.Strategy" in inspect.getsource(TaskyardTask.start_strategy)
    # update_strategies builds each task's tracer after its strategy: the handler reads
    # task.__trace__ per message, not when the strategy is made.
    source = inspect.getsource(Consumer.update_strategies)
    assert source.index("start_strategy") < source.index("__trace__ = build_tracer")
    handler_params = inspect.signature(default_strategy(*_fake_strategy_args())).parameters
    assert list(handler_params)[:5] == ["message", "body", "ack", "reject", "callbacks"]
    create_handler = inspect.getsource(Consumer.create_task_handler)
    assert "callbacks = self.on_task_message" in create_handler
    assert "message.ack_log_error" in create_handler
    assert "_maximum_prefetch_restored" in create_handler
    for name in ("requests", "active_requests", "total_count", "all_total_count"):
        assert hasattr(worker_state, name), name
    assert hasattr(worker_state, "successful_requests")
    on_success = inspect.getsource(Request.on_success)
    assert "failed, retval, runtime = failed__retval__runtime" in on_success
    assert "self.on_failure(retval, return_ok=True)" in on_success
    assert Request.acknowledged is False
    acknowledge = inspect.getsource(Request.acknowledge)
    assert "if not self.acknowledged" in acknowledge
    assert "decoded" in inspect.signature(Request.__init__).parameters
    # Events carry the offset from a cached reading (taskyard.monitoring.events.utcoffset).
    assert "utcoffset" in inspect.signature(EventDispatcher.send).parameters


def _fake_strategy_args() -> tuple[Any, Any, Any]:
    """A task, app and consumer good enough for Celery's default strategy to build a handler."""
    from types import SimpleNamespace

    app = lean_app.app
    task = app.tasks["leantest.add"]
    consumer = SimpleNamespace(
        hostname="seam@test",
        connection_errors=(),
        event_dispatcher=None,
        timer=SimpleNamespace(call_at=None),
        apply_eta_task=None,
        disable_rate_limits=True,
        task_buckets={},
        on_task_request=None,
        _limit_task=None,
        _limit_post_eta=None,
        pool=SoloPool(),
        controller=SimpleNamespace(state=worker_state),
    )
    return task, app, consumer


def test_strategy_is_lean_on_solo_only() -> None:
    task, app, consumer = _fake_strategy_args()
    consumer.on_task_message = set()
    consumer._maximum_prefetch_restored = True
    consumer.restart_count = 0
    assert lean.applies(task, app, consumer)
    assert lean.strategy(task, app, consumer).__qualname__.startswith("_lean_handler")
    from celery.concurrency.thread import TaskPool as ThreadPool

    consumer.pool = ThreadPool(limit=1)
    assert not lean.applies(task, app, consumer)
    assert lean.strategy(task, app, consumer).__qualname__.startswith("default")


# --- real workers ------------------------------------------------------------------------------
@pytest.mark.slow
def test_signals_results_bound_request_and_failures(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with _solo(env, tmp_path):
        _send(
            env,
            "r = lean.add.delay(2, 3)\n"
            "assert r.get(timeout=60) == 5, r.state\n"
            "w = lean.whoami.delay(1, 'x', flag=True)\n"
            "w.get(timeout=60)\n"
            "b = lean.boom.delay('b1')\n"
            "try:\n"
            "    b.get(timeout=60)\n"
            "except ValueError as exc:\n"
            "    assert 'boom b1' in str(exc)\n"
            "else:\n"
            "    raise AssertionError('boom returned')\n"
            "assert b.state == 'FAILURE'\n"
            "import redis, json\n"
            "c = redis.Redis.from_url(lean.runtime_of(lean.app).settings.redis_url)\n"
            "c.set('test:lean:ids', json.dumps([r.id, w.id, b.id]))\n",
        )
        add_id, who_id, boom_id = json.loads(redis_client.get("test:lean:ids") or "[]")
        wait_until(lambda: bool(_of(redis_client, "postrun", boom_id)), 30, 0.1, "boom's postrun")
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, 0.1, "every ack applied")
    received = {r["id"]: r for r in _of(redis_client, "received")}
    assert {received[i]["cls"] for i in (add_id, who_id, boom_id)} == {"LeanRequest"}
    assert received[add_id]["name"] == "leantest.add"
    # Celery's signals, each once, in the tracer's order.
    kinds = [r["kind"] for r in _seen(redis_client) if r.get("id") == add_id]
    assert kinds == ["received", "prerun", "success", "postrun"]
    assert _of(redis_client, "success", add_id)[0]["result"] == 5
    assert _of(redis_client, "postrun", add_id)[0]["state"] == "SUCCESS"
    (request,) = _of(redis_client, "request", who_id)
    assert request["args"] == [1, "x"] and request["kwargs"] == {"flag": True}
    assert request["routing_key"] == "high" and request["retries"] == 0
    assert request["root_id"] == who_id and request["is_eager"] is False
    assert request["hostname"].startswith("lean@")
    # A task raising: failure signal, FAILURE stored, acknowledged (not run again).
    assert _of(redis_client, "failure", boom_id)[0]["exception"] == "ValueError"
    assert _of(redis_client, "postrun", boom_id)[0]["state"] == "FAILURE"
    assert _attempts(redis_client, "b1") == 1
    assert not any(redis_client.llen(q) for q in QUEUES.split(","))


@pytest.mark.slow
def test_retry_with_countdown_and_autoretry(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    with _solo(env, tmp_path):
        _send(
            env,
            "r = lean.retry_later.delay('r1', 1.5)\n"
            "f = lean.flaky.delay('f1', 2)\n"
            "assert r.get(timeout=60) == 'done r1', r.state\n"
            "assert f.get(timeout=60) == 'ok f1', f.state\n",
        )
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, 0.1, "every ack applied")
    attempts = [r for r in _of(redis_client, "attempt") if r["key"] == "r1"]
    assert [a["retries"] for a in attempts] == [0, 1]
    # The countdown was kept (a broker-side delay): not run again before it was due.
    assert attempts[1]["at"] - attempts[0]["at"] >= 1.4
    assert _attempts(redis_client, "f1") == 3  # two autoretries, then success
    retries = _of(redis_client, "retry")
    assert len(retries) == 3  # one explicit retry, two autoretries
    assert not _of(redis_client, "failure")


@pytest.mark.slow
def test_task_events_for_flower(
    make_app: Any, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    app = make_app("lean-events", redis_url=servers.REDIS_URL)
    seen: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()

    def listen() -> None:
        with app.connection_for_read() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": seen.append})
            receiver.should_stop = False
            ready.set()

            def stop_when_told() -> None:
                stop.wait()
                receiver.should_stop = True

            threading.Thread(target=stop_when_told, daemon=True).start()
            receiver.capture(limit=None, timeout=None, wakeup=False)

    threading.Thread(target=listen, daemon=True).start()
    ready.wait(10)
    time.sleep(0.3)
    n = 20
    env = _env(redis_env)
    with _solo(env, tmp_path):
        _send(
            env,
            f"ids = [lean.add.delay(i, i).id for i in range({n})] + [lean.boom.delay('e').id]\n"
            "import redis, json\n"
            "c = redis.Redis.from_url(lean.runtime_of(lean.app).settings.redis_url)\n"
            "c.set('test:lean:ids', json.dumps(ids))\n",
        )
        ids = set(json.loads(redis_client.get("test:lean:ids") or "[]"))

        def counted() -> Counter[str]:
            return Counter(e["type"] for e in list(seen) if e.get("uuid") in ids)

        wait_until(
            lambda: counted()["task-succeeded"] == n and counted()["task-failed"] == 1,
            60,
            0.1,
            "events of every task",
        )
    stop.set()
    counts = counted()
    assert counts["task-received"] == n + 1 and counts["task-started"] == n + 1, counts
    received = [e for e in seen if e["type"] == "task-received" and e["uuid"] in ids]
    assert {e["name"] for e in received} == {"leantest.add", "leantest.boom"}
    succeeded = [e for e in seen if e["type"] == "task-succeeded" and e["uuid"] in ids]
    assert sorted(int(e["result"]) for e in succeeded) == [2 * i for i in range(n)]
    assert all(e["runtime"] >= 0 for e in succeeded)


@pytest.mark.slow
def test_poison_and_sigkill_mid_task(
    make_app: Any, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env)
    producer = make_app("lean-poison", redis_url=servers.REDIS_URL)
    redis_client.set(lean_app.GATE, 1)
    with _solo(env, tmp_path, "victim") as victim:
        with producer.producer_or_acquire() as publisher:
            publisher.publish(
                json.dumps([1, 2]),
                exchange="taskyard",
                routing_key="normal",
                content_type="application/json",
                content_encoding="utf-8",
                headers={"task": "leantest.add", "id": "poison-lean"},
                retry=True,
            )
        _send(env, "lean.hold.delay('k1')")
        wait_until(lambda: _attempts(redis_client, "k1") == 1, 30, 0.1, "hold to start")
        victim.kill(signal.SIGKILL)  # the whole process, mid-task
    store = RedisDeadLetterStore.for_runtime(runtime_of(producer))
    entries = {e.id: e for e in store.search(Query(reason="poison"))}
    assert "[args, kwargs, embed]" in entries["poison-lean"].detail
    redis_client.delete(lean_app.GATE)
    with _solo(env, tmp_path, "rescuer"):
        # Back after the lease plus a sweep, and run to the end this time.
        wait_until(lambda: bool(_of(redis_client, "held")), 60, 0.2, "hold to run again")
        wait_until(lambda: redis_client.hlen("unacked") == 0, 30, 0.1, "every ack applied")
    assert _attempts(redis_client, "k1") == 2
    assert len(_of(redis_client, "held")) == 1


@pytest.mark.slow
def test_lean_path_off_takes_celerys_request(
    redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(redis_env, TASKYARD_LEAN_PATH="false")
    with _solo(env, tmp_path, "plain"):
        _send(env, "assert lean.add.delay(1, 1).get(timeout=60) == 2")
    assert {r["cls"] for r in _of(redis_client, "received")} == {"Request"}


def test_the_lean_path_records_each_step_of_a_timeline_once(
    make_app: Any, redis_client: redis.Redis, redis_env: dict[str, str], tmp_path: Path
) -> None:
    from taskyard.monitoring import timeline

    app = make_app("lean-timeline", redis_url=servers.REDIS_URL)
    runtime = runtime_of(app)
    env = _env(redis_env, TASKYARD_MONITORING__FLUSH_INTERVAL_S="0.2")
    with _solo(env, tmp_path):
        _send(
            env,
            "import redis\n"
            "c = redis.Redis.from_url(lean.runtime_of(lean.app).settings.redis_url)\n"
            "c.set('test:lean:tl', ' '.join([lean.add.delay(1, 2).id, lean.boom.delay('t').id]))\n",
        )
        ok, failed = (redis_client.get("test:lean:tl") or b"").decode().split()

        def steps(task_id: str) -> list[str]:
            found = timeline.lookup(runtime, None, task_id)
            return [e["event"] for e in (found or {}).get("events", [])]

        wait_until(lambda: "succeeded" in steps(ok), 30, 0.2, "the succeeded step")
        wait_until(lambda: "failed" in steps(failed), 30, 0.2, "the failed step")
        time.sleep(0.6)  # more flushes: nothing recorded twice
        assert steps(ok) == ["sent", "received", "started", "succeeded"]
        # A failure is dead-lettered too (its "dead" step comes from the dead-letter hook).
        assert steps(failed)[:3] == ["sent", "received", "started"]
        assert sorted(steps(failed)[3:]) == ["dead", "failed"]


def test_a_lean_request_tells_the_capture_it_records_itself() -> None:
    from taskyard.monitoring.capture import CAPTURED_ATTR

    # The capture's task_received receiver skips requests with this attribute true; the lean
    # path (which may not import monitoring) names it on LeanRequest.
    assert getattr(lean.LeanRequest, CAPTURED_ATTR) is True
