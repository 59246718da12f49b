"""Flower's view: task-sent events from producers and task events from workers, batched."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

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
