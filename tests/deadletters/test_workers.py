"""Dead letters through real `celery worker` processes, on Redis and on RabbitMQ: a task that
kills its process goes dead after max_deliveries while the other work runs; each malformed
message variant is quarantined and the worker keeps serving; failed (after retries) and expired
tasks are recorded."""

from __future__ import annotations

import json
import os
import pickle
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.batching import inspect_batches, list_dead
from taskyard.deadletters import Query, RedisDeadLetterStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests.apps import dead as dead_app

pytestmark = pytest.mark.slow

APP = "tests.apps.dead"


@pytest.fixture
def producer(make_app: Any, broker_env: dict[str, str]) -> Any:
    overrides: dict[str, Any] = dict(dead_app.SETTINGS)
    if "TASKYARD_BROKER_URL" in broker_env:
        overrides["broker_url"] = broker_env["TASKYARD_BROKER_URL"]
    return make_app("deadtest", include=["tests.apps.dead"], **overrides)


def store_of(app: Any) -> RedisDeadLetterStore:
    return RedisDeadLetterStore.for_runtime(runtime_of(app))


def ran(client: redis.Redis) -> list[str]:
    return [x.decode() for x in client.lrange(dead_app.RAN, 0, -1)]


def publish_raw(
    app: Any,
    body: Any,
    *,
    content_type: str,
    headers: dict[str, Any],
    content_encoding: str = "utf-8",
) -> None:
    """Publish a message exactly as given (no serializer) to the normal queue."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="taskyard",
            routing_key="normal",
            content_type=content_type,
            content_encoding=content_encoding,
            headers=headers,
            retry=True,
        )


def test_crashing_task_goes_dead_after_max_deliveries(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    with celery_worker(APP, "normal", broker_env, tmp_path, concurrency=1) as worker:
        crashed = dead_app.crash.delay("a")
        for i in range(5):
            dead_app.ok.delay(str(i))
        store = store_of(producer)
        wait_until(
            lambda: store.get(crashed.id) is not None,
            90,
            0.2,
            "the crashing task in the dead letters",
        )
        wait_until(
            lambda: sum(x.startswith("ok-") for x in ran(redis_client)) == 5,
            30,
            message="the other tasks",
        )
        dead_app.ok.delay("after")
        wait_until(lambda: "ok-after" in ran(redis_client), 30, message="a task after it")
        assert worker.process.poll() is None
    entry = store.get(crashed.id)
    assert entry is not None and entry.reason == "crashed" and entry.name == dead_app.crash.name
    assert entry.deliveries == 3 and entry.queue == "normal" and entry.args == '["a"]'
    # max_deliveries=2: it ran twice, both runs killed their process; never a third time.
    assert ran(redis_client).count("crash-a") == 2
    assert store.counts() == {("normal", dead_app.crash.name, "crashed"): 1}
    # The delivery count is gone with the message.
    assert redis_client.get(runtime_of(producer).keys.deliveries(crashed.id)) is None


class _Marker:
    """Pickled, it would create a directory when loaded: proof that pickle is never loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.path),))


def test_malformed_messages_are_quarantined(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    ok = dead_app.ok.name
    marker = tmp_path / "unpickled"
    variants: dict[str, tuple[Any, str, dict[str, Any]]] = {
        "p-data": (b"\xff\xfe raw bytes", "application/data", {"task": ok, "id": "p-data"}),
        "p-dict": (json.dumps({"hello": 1}), "application/json", {"task": ok, "id": "p-dict"}),
        "p-list": (json.dumps([1, 2]), "application/json", {"task": ok, "id": "p-list"}),
        "p-json": ("{not json", "application/json", {"task": ok, "id": "p-json"}),
        "p-unknown": (
            json.dumps([[], {}, {}]),
            "application/json",
            {"task": "tests.apps.dead.nope", "id": "p-unknown"},
        ),
        "p-pickle": (
            pickle.dumps(_Marker(marker)),
            "application/x-python-serialize",
            {"task": ok, "id": "p-pickle"},
        ),
        "p-noid": (json.dumps([["x"], {}, {}]), "application/json", {"task": ok}),
        "p-noheaders": (json.dumps([["x"], {}, {}]), "application/json", {}),
    }
    store = store_of(producer)
    with celery_worker(APP, "normal", broker_env, tmp_path, concurrency=1) as worker:
        for body, content_type, headers in variants.values():
            encoding = "binary" if isinstance(body, bytes) else "utf-8"
            publish_raw(
                producer,
                body,
                content_type=content_type,
                headers=headers,
                content_encoding=encoding,
            )
        dead_app.ok.delay("after")
        wait_until(lambda: "ok-after" in ran(redis_client), 60, message="a task after them")
        wait_until(
            lambda: store.count(Query(reason="poison")) == len(variants),
            30,
            0.2,
            "every malformed message in the dead letters",
        )
        assert worker.process.poll() is None
        output = worker.output()
    assert "Unrecoverable error" not in output
    assert not marker.exists()
    entries = {e.id: e for e in store.search(Query(reason="poison"))}
    for entry_id in ("p-data", "p-dict", "p-list", "p-json", "p-unknown", "p-pickle"):
        assert entry_id in entries, entry_id
    assert "content type 'application/data' is not accepted" in entries["p-data"].detail
    assert entries["p-data"].body_encoding == "base64"
    assert entries["p-dict"].body == '{"hello": 1}'
    assert "[args, kwargs, embed]" in entries["p-list"].detail
    assert entries["p-json"].detail.startswith("undecodable")
    assert "unknown task 'tests.apps.dead.nope'" in entries["p-unknown"].detail
    assert "x-python-serialize" in entries["p-pickle"].detail
    assert entries["p-dict"].headers["id"] == "p-dict"
    nameless = [e for e in entries.values() if e.id.startswith("poison-")]
    assert len(nameless) == 2 and all("header" in e.detail for e in nameless)
    assert ran(redis_client) == ["ok-after"]


def test_failed_and_expired_tasks_are_recorded(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = store_of(producer)
    with celery_worker(APP, "normal", broker_env, tmp_path, concurrency=1):
        failed = dead_app.boom.delay("b" * 50_000)
        retried = dead_app.flaky.delay("f")
        past = datetime.now(UTC) - timedelta(seconds=5)
        expired = dead_app.ok.apply_async(("late",), expires=past)
        dead_app.ok.delay("after")
        wait_until(
            lambda: all(store.get(r.id) for r in (failed, retried, expired)),
            60,
            0.2,
            "the failed, retried and expired tasks in the dead letters",
        )
    boom = store.get(failed.id)
    assert boom is not None and boom.reason == "failed" and boom.exception_type == "ValueError"
    assert "Traceback" in boom.traceback and "boom" in boom.exception
    assert len(boom.args) <= 16 * 1024 and not boom.replayable  # capped: cannot be replayed
    flaky = store.get(retried.id)
    assert flaky is not None and flaky.attempts == 3 and flaky.exception_type == "KeyError"
    assert ran(redis_client).count("flaky-f") == 3
    late = store.get(expired.id)
    assert late is not None and late.reason == "expired" and late.args == '["late"]'
    assert "ok-late" not in ran(redis_client)
    assert {e.reason for e in store.search()} == {"failed", "expired"}


def test_crashing_batch_goes_dead_after_max_deliveries(
    producer: Any, broker_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    with celery_worker(APP, "batch", broker_env, tmp_path, concurrency=1) as worker:
        dead_app.crashy.add_many([{"i": 0, "crash": True}, {"i": 1}, {"i": 2}])
        dead_app.crashy.add_many([{"i": i} for i in range(3, 9)])
        wait_until(
            lambda: len(list_dead(producer, "crashy")) == 1,
            150,
            0.2,
            "the crashing batch in the dead letters",
        )
        wait_until(
            lambda: (
                sum(x.startswith("crashy-") and x != "crashy-crash" for x in ran(redis_client)) == 6
            ),
            30,
            message="the other batches",
        )
        assert worker.process.poll() is None
    dead = list_dead(producer, "crashy")[0]
    assert dead["size"] == 3 and dead["error"].startswith("crashed: 2 runs")
    # max_deliveries=2: the batch ran twice, each run killed its process; never a third time.
    assert ran(redis_client).count("crashy-crash") == 2
    state = next(s for s in inspect_batches(producer) if s["batch_name"] == "crashy")
    assert state["crashed"] == 1 and state["dead_items"] == 3 and state["processed"] == 6
    assert state["pending"] == 0


def test_task_timeline_is_kept_in_the_history_database(
    make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from taskyard.monitoring import history, timeline
    from taskyard.monitoring.collect import collect

    url = f"sqlite:///{tmp_path / 'history.db'}"
    app = make_app(
        "deadtest", include=["tests.apps.dead"], history_database_url=url, **dead_app.SETTINGS
    )
    runtime = runtime_of(app)
    with celery_worker(APP, "normal", redis_env, tmp_path, concurrency=1):
        retried = dead_app.flaky.delay("t")
        done = dead_app.ok.delay("t")
        wait_until(lambda: store_of(app).get(retried.id) is not None, 60, 0.2, "flaky dead")
        wait_until(
            lambda: (
                (timeline.lookup(runtime, None, retried.id) or {}).get("counts", {}).get("dead")
                == 1
            ),
            30,
            0.2,
            "the dead step flushed",
        )
        wait_until(
            lambda: (timeline.lookup(runtime, None, done.id) or {}).get("state") == "succeeded",
            30,
            0.2,
            "the ok task's timeline",
        )
    capture = runtime.capture if hasattr(runtime, "capture") else None
    if capture is not None:
        capture.flush()  # this process's "sent" events
    else:
        from taskyard.monitoring.capture import capture_of

        found = capture_of(app)
        assert found is not None
        found.flush()
    collect(runtime)
    assert redis_client.llen(runtime.keys.timeline_pending()) == 0
    engine = history.engine_for(url)
    # Read from the database alone: Redis holds none of it any more.
    flaky = timeline.lookup(runtime, engine, retried.id)
    assert flaky is not None and flaky["name"] == dead_app.flaky.name
    steps = [e["event"] for e in flaky["events"]]
    assert steps[0] == "sent" and set(steps[-2:]) == {"failed", "dead"}, steps
    assert flaky["counts"]["started"] == 3 and flaky["counts"]["retried"] == 2
    assert flaky["counts"]["failed"] == 1 and flaky["state"] == "dead"
    ok = timeline.lookup(runtime, engine, done.id)
    assert ok is not None and [e["event"] for e in ok["events"]] == [
        "sent",
        "received",
        "started",
        "succeeded",
    ]
    assert timeline.lookup(runtime, engine, "no-such-task") is None
    assert timeline.prune(engine, time.time() + 10, 5) == len(flaky["events"]) + 4


def test_items_the_transport_set_aside_join_the_dead_letters(
    make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from taskyard.deadletters.transport import DETAIL, ingest

    app = make_app("deadtest", include=["tests.apps.dead"], **dead_app.SETTINGS)
    runtime = runtime_of(app)
    store = store_of(app)
    with celery_worker(APP, "normal", redis_env, tmp_path, concurrency=1) as worker:
        redis_client.lpush("normal", b"not json \xff", b'{"no": "properties"}')
        dead_app.ok.delay("after")
        wait_until(lambda: "ok-after" in ran(redis_client), 30, message="a task after them")
        assert worker.process.poll() is None
    assert redis_client.llen(runtime.keys.broker_quarantine()) == 2
    assert ingest(runtime) == 2
    assert redis_client.llen(runtime.keys.broker_quarantine()) == 0
    entries = store.search(Query(reason="poison"))
    assert len(entries) == 2 and all(e.detail == DETAIL for e in entries)
    assert {e.body_encoding for e in entries} == {"utf-8", "base64"}
    assert ingest(runtime) == 0
