"""Flower's view: task-sent events from producers and task events from workers, batched."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange

from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers
from tests.apps import prio


def _listen(
    app: Celery, seen: list[dict[str, Any]], ready: threading.Event, stop: threading.Event
) -> None:
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        ready.set()
        # capture() runs until should_stop; the wakeup-free drain loop checks it between events.
        receiver.should_stop = False

        def watch() -> None:
            stop.wait()
            receiver.should_stop = True

        threading.Thread(target=watch, daemon=True).start()
        receiver.capture(limit=None, timeout=None, wakeup=False)


@pytest.mark.slow
def test_every_task_is_seen_sent_received_started_succeeded(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    app = make_app("events", redis_url=servers.REDIS_URL)  # current app: prio's tasks send here
    seen: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=_listen, args=(app, seen, ready, stop), daemon=True)
    listener.start()
    ready.wait(10)
    time.sleep(0.3)  # the receiver's subscription is in place
    n = 30
    with celery_worker("tests.apps.prio", "critical,low", redis_env, tmp_path, name="events"):
        ids = {prio.critical_work.delay(i).id for i in range(n)}

        def counted() -> Counter[str]:
            return Counter(e["type"] for e in list(seen) if e.get("uuid") in ids)

        try:
            wait_until(
                lambda: counted()["task-succeeded"] == n and counted()["task-sent"] == n,
                30,
                message="events of every task",
            )
        except AssertionError:
            raise AssertionError(f"{counted()} of {len(seen)} events") from None
    stop.set()
    counts = counted()
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert counts[kind] == n, counts
    sent = [e for e in seen if e["type"] == "task-sent" and e["uuid"] in ids]
    assert {e["queue"] for e in sent} == {"critical"}
    assert all(e["name"] == "tests.apps.prio.critical_work" for e in sent)


def test_sent_events_are_batched(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("events-batch", redis_url=servers.REDIS_URL, event_flush_interval_s=5)
    buffer = runtime_of(app).sent_events
    published: list[Any] = []
    pubsub = redis_client.pubsub()
    # Channels are server-wide, not per database: kombu prefixes them with the database
    # ("/<db>.celeryev/..."), so this sees only this test's events, not a parallel worker's.
    pubsub.psubscribe(f"/{servers.REDIS_DB}.celeryev*")
    wait_until(lambda: pubsub.get_message(timeout=0.1) is not None, 5)

    @app.task(name="t.batched", shared=False)
    def batched() -> None: ...

    for _ in range(25):
        batched.delay()
    assert len(buffer._events) == 25  # held, not yet published
    buffer.flush()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not published:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "pmessage":
            published.append(message)
    pubsub.close()
    assert len(published) == 1  # 25 events, one publish
    assert b"task.multi" in published[0]["channel"] or b"task-sent" in published[0]["data"]


def _task_sent(pubsub: Any, ids: set[str], timeout_s: float) -> set[str]:
    """Ids of ``ids`` whose task-sent events arrive on ``pubsub`` within ``timeout_s``."""
    got: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and got != ids:
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "pmessage":
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            got |= {event.get("uuid") for event in json.loads(body)} & ids
    return got


def _producer(make_app: Any, name: str, probe_s: float, flush_s: float = 0.05) -> tuple[Any, Any]:
    """An app flushing its task-sent events every ``flush_s``, its event buffer and a task."""
    app = make_app(
        name,
        redis_url=servers.REDIS_URL,
        event_flush_interval_s=flush_s,
        event_probe_interval_s=probe_s,
    )

    @app.task(name=f"t.{name}", shared=False)
    def task() -> None: ...

    return runtime_of(app).sent_events, task


def test_a_producer_records_task_sent_events_only_while_someone_listens(
    make_app: Any, redis_client: redis.Redis
) -> None:
    buffer, heard = _producer(make_app, "events-audience", 0.2)
    heard.delay()  # published to nobody: the producer stops recording
    wait_until(lambda: not buffer.audience.listening, 10, 0.05, "events paused")
    for _ in range(5):
        heard.delay()
    assert not buffer._events  # nothing recorded, nothing to publish
    pubsub = redis_client.pubsub()
    pubsub.psubscribe(f"/{servers.REDIS_DB}.celeryev*")
    wait_until(lambda: buffer.audience.listening, 10, 0.05, "a probe to find the listener")
    ids = {heard.delay().id for _ in range(3)}
    assert _task_sent(pubsub, ids, 10) == ids
    pubsub.close()


def test_events_are_published_always_with_probing_off(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # Flushed by hand only: the background flush (every 5 s) does not race the counts.
    buffer, always = _producer(make_app, "events-always", 0, flush_s=5)
    always.delay()
    buffer.flush()  # a batch that reaches nobody: with probing off, nothing pauses
    assert buffer.audience.listening
    always.delay()
    assert len(buffer._events) == 1


def test_the_transport_keeps_how_many_subscribers_a_fanout_publish_reached(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("events-reach", redis_url=servers.REDIS_URL)
    exchange = f"reach-{time.monotonic_ns()}"
    with app.producer_or_acquire() as producer:
        channel = producer.channel
        ex = Exchange(exchange, type="fanout", durable=False)
        producer.publish({"n": 1}, exchange=ex, routing_key="a.b", declare=[ex])
        assert channel.fanout_reach[(exchange, "a.b")] == 0
        pubsub = redis_client.pubsub()
        pubsub.psubscribe(f"/{servers.REDIS_DB}.{exchange}/*")
        wait_until(lambda: pubsub.get_message(timeout=0.1) is not None, 5)
        producer.publish({"n": 2}, exchange=ex, routing_key="a.b", declare=[ex])
        assert channel.fanout_reach[(exchange, "a.b")] == 1
        pubsub.close()


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["solo", "prefork"])  # the lean path, and Celery's request
def test_a_worker_pauses_task_events_without_a_listener_and_resumes_for_one(
    pool: str, make_app: Any, redis_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    app = make_app("events-resume", redis_url=servers.REDIS_URL)
    env = {**redis_env, "TASKYARD_EVENT_PROBE_INTERVAL_S": "0.3"}
    with celery_worker(
        "tests.apps.prio", "critical", env, tmp_path, name="quiet", pool=pool, concurrency=1
    ) as worker:
        prio.critical_work.delay(0)
        wait_until(
            lambda: "task events paused" in worker.output(), 30, 0.1, "the worker to pause events"
        )
        seen: list[dict[str, Any]] = []
        ready, stop = threading.Event(), threading.Event()
        threading.Thread(target=_listen, args=(app, seen, ready, stop), daemon=True).start()
        ready.wait(10)
        wait_until(lambda: "task events resumed" in worker.output(), 30, 0.1, "a probe to find it")
        n = 10
        ids = {prio.critical_work.delay(i).id for i in range(1, n + 1)}

        def counted() -> Counter[str]:
            return Counter(e["type"] for e in list(seen) if e.get("uuid") in ids)

        wait_until(lambda: counted()["task-succeeded"] == n, 30, 0.1, "events of every task")
        stop.set()
    counts = counted()
    assert counts["task-received"] == n and counts["task-started"] == n, counts
