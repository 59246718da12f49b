"""Batch buffers against real Redis, without workers: claims, groups, limits, reaper, inspection."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from taskyard import BatchBufferFull, BatchItemError, ConfigurationError, RoutingError, batch_task
from taskyard.batching import inspect_batches, list_dead, purge_dead, reap, requeue_dead
from taskyard.batching.buffer import BatchBuffer
from taskyard.runtime import runtime_of
from taskyard.signals import batch_flushed
from taskyard.testing import wait_until
from tests.servers import RedisServer


def messages(client: redis.Redis, queue: str = "batch") -> list[tuple[str, list[Any]]]:
    """(task name, args) of the Celery messages waiting in a Redis-broker queue."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSHed: newest first
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        out.append((message["headers"]["task"], args))
    return out


def batch_items(client: redis.Redis, app: Any, name: str, batch_id: str) -> list[Any]:
    key = runtime_of(app).keys.batch_items(name, batch_id)
    return [json.loads(x) for x in client.lrange(key, 0, -1)]


@pytest.fixture
def flushed() -> Any:
    seen: list[dict[str, Any]] = []

    def receiver(sender: str, **kwargs: Any) -> None:
        seen.append({"batch_name": sender, **{k: v for k, v in kwargs.items() if k != "signal"}})

    batch_flushed.connect(receiver, weak=False)
    yield seen
    batch_flushed.disconnect(receiver)


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
        ({"max_wait": 0}, "max_wait=0"),
        ({"max_wait": -1.0}, "max_wait=-1.0"),
        ({"max_retries": -1}, "max_retries=-1"),
        ({"max_buffered": 10, "batch_size": 20}, "max_buffered=10"),
        ({"batch_name": "bad name"}, "batch_name='bad name'"),
        ({"key": "tenant"}, "key='tenant'"),
    ],
)
def test_options_are_checked_at_decoration(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        batch_task(**options)
    assert fragment in str(info.value)


def test_unknown_level_names_value_and_levels() -> None:
    with pytest.raises(RoutingError) as info:
        batch_task(batch_name="x", priority="urgent")
    assert "'urgent'" in str(info.value) and "critical, high, normal, low, batch" in str(info.value)


def test_delay_claims_a_batch_when_full_and_publishes_only_its_id(
    make_app: Any, redis_client: redis.Redis, flushed: list[dict[str, Any]]
) -> None:
    app = make_app("b1")

    @batch_task(batch_name="emails", batch_size=3, max_wait=60)
    def send(items: list[Any]) -> None: ...

    results = [send.delay({"n": i}) for i in range(7)]
    assert [r.batch_ids for r in results] == [(), (), ("1",), (), (), ("2",), ()]
    assert messages(redis_client) == [(send.name, ["1"]), (send.name, ["2"])]
    assert batch_items(redis_client, app, "emails", "1") == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert batch_items(redis_client, app, "emails", "2") == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert [(f["batch_name"], f["batch_id"], f["size"], f["reason"]) for f in flushed] == [
        ("emails", "1", 3, "size"),
        ("emails", "2", 3, "size"),
    ]
    [state] = inspect_batches(app)
    assert state["buffered"] == 1 and state["in_flight"] == 2 and state["pending"] == 7
    assert state["flush_reasons"] == {"size": 2}


def test_level_of_the_flush_task(make_app: Any, redis_client: redis.Redis) -> None:
    make_app("b2")

    @batch_task(batch_name="reports", batch_size=1, priority="low")
    def build(items: list[Any]) -> None: ...

    build.delay(1)
    assert messages(redis_client, "low") == [(build.name, ["1"])]
    assert redis_client.llen("batch") == 0


def test_add_many_forms_every_full_batch(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("b3")

    @batch_task(batch_name="audit", batch_size=100, max_wait=60)
    def write(items: list[Any]) -> None: ...

    write.delay({"i": -1})
    result = write.add_many({"i": i} for i in range(5000))
    assert result.accepted == 5000 and len(result.batch_ids) == 50
    assert len(messages(redis_client)) == 50
    seen: list[Any] = []
    for batch_id in result.batch_ids:
        items = batch_items(redis_client, app, "audit", batch_id)
        assert len(items) == 100
        seen.extend(item["i"] for item in items)
    buffered = [
        json.loads(x)
        for x in redis_client.lrange(runtime_of(app).keys.batch_buffer("audit"), 0, -1)
    ]
    seen.extend(item["i"] for item in buffered)
    assert seen == list(range(-1, 5000))  # order kept, nothing lost, nothing twice


def test_key_function_gives_each_key_its_own_buffer(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("b4")

    @batch_task(batch_name="notify", batch_size=3, max_wait=60, key=lambda item: item["tenant"])
    def notify(items: list[Any]) -> None: ...

    notify.add_many([{"tenant": t, "i": i} for i in range(4) for t in ("a", "b")])
    notify.delay({"tenant": "c", "i": 0})
    ids = [args[0] for _, args in messages(redis_client)]
    assert len(ids) == 2
    for batch_id in ids:
        items = batch_items(redis_client, app, "notify", batch_id)
        assert len(items) == 3 and len({item["tenant"] for item in items}) == 1
    [state] = inspect_batches(app)
    groups = {g["group"]: g for g in state["groups"]}
    assert {g: groups[g]["buffered"] for g in groups} == {"a": 1, "b": 1, "c": 1}
    assert {g: groups[g]["in_flight"] for g in groups} == {"a": 1, "b": 1, "c": 0}


def test_max_buffered_refuses_at_add_time(make_app: Any, redis_client: redis.Redis) -> None:
    make_app("b5")

    @batch_task(batch_name="capped", batch_size=2, max_wait=60, max_buffered=5)
    def capped(items: list[Any]) -> None: ...

    for i in range(5):
        capped.delay(i)  # 2 batches in flight + 1 buffered: 5 pending
    with pytest.raises(BatchBufferFull) as info:
        capped.delay(5)
    assert info.value.buffered == 5 and info.value.limit == 5
    assert "max_buffered=5" in str(info.value)
    with pytest.raises(BatchBufferFull):
        capped.add_many([6, 7])
    [state] = inspect_batches(runtime_of(capped.state().app))
    assert state["pending"] == 5 and state["buffered"] == 1


def test_add_many_reports_what_the_limit_refused(make_app: Any) -> None:
    make_app("b6")

    @batch_task(
        batch_name="capped2", batch_size=2, max_wait=60, max_buffered=3, key=lambda item: item % 2
    )
    def capped2(items: list[Any]) -> None: ...

    # Groups are appended as separate chunks: evens (3 items) fit, odds (2 more) do not.
    with pytest.raises(BatchBufferFull) as info:
        capped2.add_many([0, 1, 2, 3, 4])
    assert info.value.accepted == 3 and info.value.rejected == (1, 3)


def test_bad_items_are_refused_with_their_type_and_size(
    make_app: Any, redis_client: redis.Redis
) -> None:
    make_app("b7")

    @batch_task(batch_name="strict", batch_size=10, max_item_bytes=64)
    def strict(items: list[Any]) -> None: ...

    with pytest.raises(BatchItemError) as info:
        strict.delay({1, 2})
    assert "type set" in str(info.value) and info.value.item_type == "set"
    with pytest.raises(BatchItemError) as info:
        strict.delay({"text": "x" * 100})
    assert info.value.size == 111 and "111 bytes, over max_item_bytes=64" in str(info.value)
    with pytest.raises(BatchItemError):
        strict.delay(float("nan"))
    with pytest.raises(BatchItemError):
        strict.add_many([1, 2, object()])  # nothing of the call is appended
    assert inspect_batches(runtime_of(strict.state().app)) == []


def test_reaper_flushes_by_age_only_when_due(
    make_app: Any, redis_client: redis.Redis, flushed: list[dict[str, Any]]
) -> None:
    app = make_app("b8")

    @batch_task(batch_name="aged", batch_size=100, max_wait=0.3)
    def aged(items: list[Any]) -> None: ...

    aged.add_many(range(5))
    assert reap(app) == {"claimed": 0, "republished": 0}
    time.sleep(0.35)
    assert reap(app) == {"claimed": 1, "republished": 0}
    assert messages(redis_client) == [(aged.name, ["1"])]
    assert batch_items(redis_client, app, "aged", "1") == [0, 1, 2, 3, 4]
    assert flushed[-1]["reason"] == "age" and flushed[-1]["size"] == 5
    [state] = inspect_batches(app)
    assert state["flush_reasons"] == {"age": 1} and state["buffered"] == 0


def test_reaper_republishes_a_batch_whose_lease_ran_out(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("b9")

    @batch_task(batch_name="leased", batch_size=2, max_wait=60, lease_s=0.2)
    def leased(items: list[Any]) -> None: ...

    leased.add_many([1, 2])
    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "leased")
    assert buffer.acquire("1", "worker-a", 200).status == "ok"
    assert buffer.acquire("1", "worker-b", 200).status == "busy"  # the holder is alive
    time.sleep(0.25)  # the holder stopped renewing: died
    assert reap(app)["republished"] == 1
    assert len(messages(redis_client)) == 2
    taken = buffer.acquire("1", "worker-b", 10_000)
    assert taken.status == "ok" and taken.duplicate and taken.deliveries == 2
    assert buffer.complete("1") == 2
    assert buffer.complete("1") == -1  # a late completion by the dead holder counts nothing
    [state] = inspect_batches(app)
    assert state["processed"] == 2 and state["duplicates"] == 1 and state["lease_expired"] == 1


def test_same_message_redelivered_takes_over_at_once(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("b10")

    @batch_task(batch_name="redeliver", batch_size=1, max_wait=60)
    def redeliver(items: list[Any]) -> None: ...

    redeliver.delay(1)
    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "redeliver")
    assert buffer.acquire("1", "task-id-1", 60_000).status == "ok"
    # The broker gives the same message (same task id) again: its first worker died.
    again = buffer.acquire("1", "task-id-1", 60_000)
    assert again.status == "ok" and again.duplicate


def test_dead_letters_list_requeue_purge(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("b11")

    @batch_task(batch_name="doomed", batch_size=2, max_wait=60, max_retries=1)
    def doomed(items: list[Any]) -> None: ...

    doomed.add_many([{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}])
    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "doomed")
    for batch_id in ("1", "2"):
        for attempt in range(2):
            assert buffer.acquire(batch_id, f"t{attempt}", 60_000).status == "ok"
            out = buffer.fail(
                batch_id,
                f"t{attempt}",
                max_retries=1,
                backoff_ms=0,
                lease_ms=60_000,
                error="ValueError: boom",
            )
            assert out.status == ("retry" if attempt == 0 else "dead")
    dead = list_dead(app, "doomed")
    assert [(d["batch_id"], d["size"], d["attempts"], d["error"]) for d in dead] == [
        ("1", 2, 2, "ValueError: boom"),
        ("2", 2, 2, "ValueError: boom"),
    ]
    assert dead[0]["items"] == ['{"a":1}', '{"a":2}']
    [state] = inspect_batches(app)
    assert state["dead"] == 2 and state["dead_items"] == 4 and state["pending"] == 0
    redis_client.delete("batch")
    assert requeue_dead(app, "doomed", ["1"]) == ["1"]
    assert messages(redis_client) == [(doomed.name, ["1"])]
    taken = buffer.acquire("1", "t9", 60_000)
    assert taken.status == "ok" and taken.attempts == 0
    assert buffer.complete("1") == 2
    assert purge_dead(app, "doomed") == 2
    [state] = inspect_batches(app)
    assert state["dead"] == 0 and state["processed"] == 2 and state["purged_items"] == 2


def test_partial_failure_keeps_only_failed_items(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("b12")

    @batch_task(batch_name="partial", batch_size=4, max_wait=60)
    def partial(items: list[Any]) -> None: ...

    partial.add_many(["a", "b", "c", "d"])
    buffer = BatchBuffer(redis_client, runtime_of(app).keys, "partial")
    buffer.acquire("1", "t", 60_000)
    out = buffer.fail(
        "1", "t", max_retries=3, backoff_ms=0, lease_ms=60_000, error="x", failed=[1, 3]
    )
    assert (out.status, out.failed) == ("retry", 2)
    assert buffer.acquire("1", "u", 60_000).entries == (b'"b"', b'"d"')
    [state] = inspect_batches(app)
    assert state["processed"] == 2 and state["pending"] == 2 and state["failed"] == 2


def test_concurrent_producers_lose_nothing(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("b13")

    @batch_task(batch_name="crowd", batch_size=7, max_wait=60)
    def crowd(items: list[Any]) -> None: ...

    def produce(worker: int) -> None:
        for i in range(300):
            if i % 50 == 0:
                crowd.add_many([[worker, i, k] for k in range(20)])
            else:
                crowd.delay([worker, i])

    crowd.state(app)  # Celery's current app is per thread: the threads use the last one
    threads = [threading.Thread(target=produce, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    keys = runtime_of(app).keys
    seen: list[Any] = []
    batch_ids = [args[0] for _, args in messages(redis_client)]
    assert len(batch_ids) == len(set(batch_ids))
    for batch_id in batch_ids:
        items = batch_items(redis_client, app, "crowd", batch_id)
        assert len(items) == 7
        seen.extend(tuple(x) for x in items)
    seen.extend(
        tuple(json.loads(x)) for x in redis_client.lrange(keys.batch_buffer("crowd"), 0, -1)
    )
    expected: set[tuple[int, ...]] = {(w, i) for w in range(6) for i in range(300) if i % 50}
    expected |= {(w, i, k) for w in range(6) for i in range(0, 300, 50) for k in range(20)}
    assert len(seen) == len(expected) and set(seen) == expected
    [state] = inspect_batches(app)
    assert state["pending"] == len(expected)


def test_scripts_are_reloaded_after_a_redis_restart(
    make_app: Any, redis_server: Callable[..., RedisServer]
) -> None:
    # A server of this test's own: SCRIPT FLUSH empties a whole server's script cache, and
    # the suite's other workers share the suite's server.
    server = redis_server()
    redis_client = redis.Redis(port=server.port)
    app = make_app("b14", redis_url=server.url)

    @batch_task(batch_name="restart", batch_size=2, max_wait=0.1)
    def restart(items: list[Any]) -> None: ...

    restart.delay(1)
    redis_client.script_flush()  # what a restart does to the script cache
    assert restart.delay(2).batch_ids == ("1",)
    redis_client.script_flush()
    assert restart.add_many([3]).accepted == 1
    redis_client.script_flush()
    time.sleep(0.15)
    assert reap(app)["claimed"] == 1
    assert batch_items(redis_client, app, "restart", "2") == [3]


def test_bare_decorator_and_direct_call(make_app: Any, redis_client: redis.Redis) -> None:
    make_app("b15")

    @batch_task
    def audit_rows(items: list[Any]) -> int:
        return len(items)

    assert audit_rows.batch_name == "audit_rows" and audit_rows.batch_size == 100
    assert audit_rows.level.value == "batch" and audit_rows([1, 2]) == 2
    assert audit_rows.add_many(range(250)).batch_ids == ("1", "2")
    assert audit_rows.flush().batch_ids == ("3",)
    assert [args for _, args in messages(redis_client)] == [["1"], ["2"], ["3"]]


def test_a_failing_key_function_names_the_item_type(make_app: Any) -> None:
    make_app("b16")

    @batch_task(batch_name="keyed", key=lambda item: item["tenant"])
    def keyed(items: list[Any]) -> None: ...

    with pytest.raises(BatchItemError) as info:
        keyed.delay({"no": "tenant"})
    assert "key function failed on an item of type dict" in str(info.value)


def test_broker_down_at_flush_time_loses_nothing(
    make_app: Any, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # The buffers' Redis answers, the broker does not: the claimed batch waits under its lease.
    down = make_app(
        "b17",
        broker_url="redis://127.0.0.1:1/0",
        publish_max_retries=0,
        broker_connect_timeout_s=0.5,
    )

    @batch_task(batch_name="unsent", batch_size=2, max_wait=60, lease_s=0.3)
    def unsent(items: list[Any]) -> None: ...

    unsent.delay(1)
    assert unsent.delay(2).batch_ids == ("1",)  # accepted: no error for the producer
    assert "not published" in caplog.text
    assert redis_client.llen("batch") == 0
    up = make_app("b17-up")
    time.sleep(0.35)
    assert reap(up)["republished"] == 1
    assert messages(redis_client) == [(unsent.name, ["1"])]
    assert runtime_of(down).redis.llen(runtime_of(down).keys.batch_items("unsent", "1")) == 2


def test_eager_mode_runs_batches_in_place(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("b18", task_always_eager=True, batch={"retry_backoff_s": 0, "max_retries": 1})
    seen: list[list[Any]] = []

    @batch_task(batch_name="eager", batch_size=3, max_wait=60)
    def eager(items: list[Any]) -> None:
        seen.append(items)
        if "bad" in items:
            raise ValueError("bad item")

    eager.add_many([1, 2, 3, 4])
    assert seen == [[1, 2, 3]] and redis_client.llen("batch") == 0
    eager.add_many(["bad", 5])
    assert seen[1:] == [[4, "bad", 5], [4, "bad", 5]]  # one retry, then the dead letters
    [state] = inspect_batches(app)
    assert state["processed"] == 3 and state["dead_items"] == 3 and state["pending"] == 0


def test_bulk_flushes_still_send_their_task_sent_events(
    make_app: Any, redis_client: redis.Redis
) -> None:
    # add_many sends the task-sent events of its flush messages as one list message.
    app = make_app("b19")

    @batch_task(batch_name="evented", batch_size=2, max_wait=60)
    def evented(items: list[Any]) -> None: ...

    seen: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    receivers: list[Any] = []

    failures: list[BaseException] = []

    def listen() -> None:
        try:
            with app.connection_for_read() as conn:
                receiver = app.events.Receiver(
                    conn, handlers={"task-sent": seen.append, "taskyard-probe": probes.append}
                )
                receivers.append(receiver)
                with contextlib.suppress(TimeoutError):
                    receiver.capture(limit=None, timeout=20, wakeup=False)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    # Probe until the receiver's subscription is in place (pub/sub drops what came before).
    with app.events.default_dispatcher() as dispatcher:
        wait_until(
            lambda: dispatcher.send("taskyard-probe") or bool(probes) or bool(failures),
            15,
            0.1,
            message="the event receiver",
        )
    assert not failures, failures
    evented.add_many(range(6))
    evented.delay(6)
    evented.delay(7)
    # Events are published in batches, so a late one of an earlier test may arrive too.
    mine = lambda: [e for e in seen if e["name"] == evented.name]  # noqa: E731
    wait_until(lambda: len(mine()) >= 4, 15, message="4 task-sent events")
    receivers[0].should_stop = True
    thread.join(25)
    sent_ids = {args[0] for _, args in messages(redis_client)}
    assert sent_ids == {"1", "2", "3", "4"}
    assert len(mine()) == 4
    assert {e["queue"] for e in mine()} == {"batch"}
