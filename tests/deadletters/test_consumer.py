"""The seam of the dead-letter gate with Celery's consumer internals, tested directly: the
handlers it replaces and the callback it wraps still exist and are read where it relies on, and
the gate's checks on real kombu messages (memory transport) quarantine into the real store."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.worker import loops
from celery.worker.consumer import consumer as celery_consumer
from kombu import Connection, Exchange, Queue

from taskyard.deadletters import RedisDeadLetterStore
from taskyard.deadletters.consumer import DeadLetterGate, Gate
from taskyard.runtime import runtime_of


def test_celery_internals_the_gate_relies_on() -> None:
    # That the names exist is checked with every other seam (tests/test_seams.py); here, how
    # Celery uses them. The loops build the callback when they start, from the consumer instance...
    for loop in (loops.asynloop, loops.synloop):
        assert "obj.create_task_handler()" in inspect.getsource(loop)
    # ...and the callback reads the handlers from the instance (so instance attributes win).
    source = inspect.getsource(celery_consumer.Consumer.create_task_handler)
    for name in (
        "self.on_unknown_message",
        "self.on_unknown_task",
        "self.on_invalid_task",
        "self.on_decode_error",
    ):
        assert name in source, name
    # Tasks.start hands the consumer's on_decode_error to kombu's consumer.
    from celery.worker.consumer import tasks

    assert "on_decode_error=c.on_decode_error" in inspect.getsource(tasks.Tasks.start)


@pytest.fixture
def shell(make_app: Any) -> Any:
    app = make_app("gatetest")

    @app.task(name="gate.ok", shared=False)
    def ok() -> None: ...

    calls: list[Any] = []

    def create_task_handler() -> Any:
        return calls.append

    consumer = SimpleNamespace(
        app=app,
        hostname="gate@test",
        strategies={"gate.ok": object()},
        connection_errors=(ConnectionError,),
        channel_errors=(),
        create_task_handler=create_task_handler,
        calls=calls,
    )
    DeadLetterGate(consumer)
    return consumer


def _messages(bodies: list[tuple[Any, str, dict[str, Any], bool]]) -> list[Any]:
    exchange = Exchange("gate", type="direct")
    queue = Queue("normal", exchange, routing_key="normal")
    conn = Connection("memory://")
    channel = conn.channel()
    bound = queue(channel)
    bound.declare()
    producer = conn.Producer(channel, exchange=exchange)
    out = []
    for body, content_type, headers, redelivered in bodies:
        producer.publish(
            body,
            routing_key="normal",
            content_type=content_type,
            content_encoding="utf-8" if isinstance(body, str) else "binary",
            headers=headers,
        )
        message = bound.get(accept=["json"])
        assert message is not None
        if redelivered:
            message.delivery_info["redelivered"] = True
        out.append(message)
    return out


def test_gate_checks_real_messages(shell: Any, redis_client: redis.Redis) -> None:
    handler = shell.create_task_handler()
    good, data, unknown, list_body = _messages(
        [
            (json.dumps([[], {}, {}]), "application/json", {"task": "gate.ok", "id": "g1"}, False),
            (b"\xff raw", "application/data", {"task": "gate.ok", "id": "p1"}, False),
            (
                json.dumps([[], {}, {}]),
                "application/json",
                {"task": "gate.nope", "id": "p2"},
                False,
            ),
            (json.dumps([1]), "application/json", {"task": "gate.ok", "id": "p3"}, False),
        ]
    )
    for message in (good, data, unknown, list_body):
        handler(message)
    assert shell.calls == [good]  # only the task went on to Celery
    assert not good.acknowledged and data.acknowledged and unknown.acknowledged
    store = RedisDeadLetterStore.for_runtime(runtime_of(shell.app))
    assert {e.id for e in store.search()} == {"p1", "p2", "p3"}
    # Celery's own handlers are the gate's now: an invalid task is quarantined, not dropped.
    (invalid,) = _messages(
        [(json.dumps([[], {}, {}]), "application/json", {"task": "gate.ok", "id": "p4"}, False)]
    )
    shell.on_invalid_task(None, invalid, ValueError("bad eta"))
    entry = store.get("p4")
    assert entry is not None and entry.detail == "invalid task: bad eta" and invalid.acknowledged


def test_gate_counts_only_redeliveries(shell: Any, redis_client: redis.Redis) -> None:
    handler = shell.create_task_handler()
    keys = runtime_of(shell.app).keys
    limit = runtime_of(shell.app).settings.max_deliveries
    body = json.dumps([["x"], {}, {}])
    first = _messages([(body, "application/json", {"task": "gate.ok", "id": "r1"}, False)])
    handler(first[0])
    assert redis_client.get(keys.deliveries("r1")) is None  # a first delivery costs nothing
    again = _messages(
        [(body, "application/json", {"task": "gate.ok", "id": "r1"}, True) for _ in range(limit)]
    )
    for message in again:
        handler(message)
    # Deliveries 2..limit ran; delivery limit + 1 went to the dead letters instead.
    assert len(shell.calls) == limit and again[-1].acknowledged
    entry = RedisDeadLetterStore.for_runtime(runtime_of(shell.app)).get("r1")
    assert entry is not None and entry.reason == "crashed" and entry.deliveries == limit + 1
    assert entry.args == '["x"]' and redis_client.get(keys.deliveries("r1")) is None


def test_gate_limits_per_task(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("gatelimit")

    @app.task(name="gate.fragile", shared=False, max_deliveries=1)
    def fragile() -> None: ...

    gate = Gate(SimpleNamespace(app=app, hostname="h", strategies={}, connection_errors=()))
    assert gate.limit_of(fragile.name) == 1
    assert gate.limit_of("unknown.task") == runtime_of(app).settings.max_deliveries


def test_poison_kept_capped_and_replayable_only_whole(
    shell: Any, redis_client: redis.Redis
) -> None:
    from taskyard.deadletters.replay import replay_one
    from taskyard.errors import DeadLetterError

    handler = shell.create_task_handler()
    big = json.dumps([["y" * 40_000], {}, {}])
    small = json.dumps([["z"], {}, {}])
    for message in _messages(
        [
            (big, "application/json", {"task": "gate.later", "id": "u1"}, False),
            (small, "application/json", {"task": "gate.later", "id": "u2"}, False),
        ]
    ):
        handler(message)
    store = RedisDeadLetterStore.for_runtime(runtime_of(shell.app))
    cut, whole = store.get("u1"), store.get("u2")
    assert cut is not None and whole is not None
    assert len(cut.body) == 16 * 1024 and not cut.replayable and whole.replayable
    with pytest.raises(DeadLetterError, match="cut to the size cap"):
        replay_one(shell.app, store, "u1")
    with pytest.raises(DeadLetterError, match="cannot become a task"):
        store.record(whole.__class__(id="u3", reason="poison", detail="not a task", body="x"))
        replay_one(shell.app, store, "u3")
