"""True queue depth: all priority sub-lists plus reserved messages (Redis), broker counts (AMQP)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from taskyard.monitoring.queues import PRIORITY_SEP, amqp_depths, priority_lists, redis_depths
from taskyard.monitoring.store import StatsStore
from taskyard.runtime import runtime_of
from taskyard.testing import celery_worker, wait_until
from tests import servers


def test_priority_list_names_follow_kombu() -> None:
    from kombu.transport.redis import Channel

    assert PRIORITY_SEP == "\x06\x16"
    assert priority_lists("low") == ["low", "low\x06\x163", "low\x06\x166", "low\x06\x169"]
    channel_like = type(
        "C", (), {"sep": Channel.sep, "priority_steps": [0, 3, 6, 9], "priority": Channel.priority}
    )()
    for pri in (0, 3, 5, 6, 9):
        assert Channel._q_for_pri(channel_like, "low", pri) in priority_lists("low")


def test_depth_counts_every_priority_list(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("depth")

    def noop() -> None:
        return None

    task = app.task(name="depth.noop", shared=False)(noop)
    for priority in (0, 0, 2, 4, 4, 4, 7, 9):  # steps 0, 0, 0, 3, 3, 3, 6, 9
        task.apply_async(level="low", priority=priority)
    naive = redis_client.llen("low")  # what Flower / celery-exporter count
    store = StatsStore(runtime_of(app))
    low = next(q for q in store.queues() if q["queue"] == "low")
    assert naive == 3
    assert {
        k: low[k] for k in ("queue", "depth", "ready", "reserved", "reserved_known", "scheduled")
    } == {
        "queue": "low",
        "depth": 8,
        "ready": 8,
        "reserved": 0,
        "reserved_known": True,
        "scheduled": 0,
    }
    assert all(q["depth"] == 0 for q in store.queues() if q["queue"] != "low")


def test_reserved_messages_are_attributed_to_their_queue(redis_client: redis.Redis) -> None:
    # Shape of kombu's unacked HASH: tag -> [message, exchange, routing_key].
    import json

    redis_client.hset("unacked", "t1", json.dumps([{"body": "x"}, "taskyard", "critical"]))
    redis_client.hset(
        "unacked",
        "t2",
        json.dumps([{"properties": {"delivery_info": {"routing_key": "batch"}}}, "", "other"]),
    )
    redis_client.hset("unacked", "t3", b"not json")
    depths = {d.queue: d for d in redis_depths(redis_client)}
    assert depths["critical"].reserved == 1
    assert depths["batch"].reserved == 1
    assert sum(d.reserved for d in depths.values()) == 2


@pytest.mark.slow
def test_depth_with_worker_holding_reserved_messages(
    make_app: Any, redis_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.apps import monitor

    producer = make_app("monitor")
    store = StatsStore(runtime_of(producer))
    # One reservation per process: a worker refills in steps (when half its prefetch is
    # free), so with more it may hold one less than its prefetch, by when messages arrive.
    env = {
        **redis_env,
        "TASKYARD_GUARD__ENABLED": "false",
        "TASKYARD_URGENT_PREFETCH_MULTIPLIER": "1",
    }
    with celery_worker(
        "tests.apps.monitor", "high", env, tmp_path, concurrency=2, name="holder"
    ) as worker:
        for priority in (0, 3, 6, 9, 9):
            producer.send_task(monitor.sleepy.name, args=(20.0,), priority=priority)

        def high() -> dict[str, Any]:
            return next(q for q in store.queues() if q["queue"] == "high")

        # Prefetch 1 x concurrency 2: the worker reserves two, three stay in the broker.
        wait_until(lambda: high()["reserved"] == 2, 30, 0.1, f"2 reserved, have {high()}")
        assert {
            k: high()[k] for k in ("queue", "depth", "ready", "reserved", "reserved_known")
        } == {"queue": "high", "depth": 5, "ready": 3, "reserved": 2, "reserved_known": True}
        worker.kill()
    # SIGKILLed before acknowledging: the reserved two are still owed to the queue.
    assert high()["depth"] == 5


def test_countdown_messages_count_as_scheduled_not_depth(
    make_app: Any, redis_client: redis.Redis
) -> None:
    app = make_app("depth-delays")
    for level, countdown in (("normal", 60), ("normal", 60), ("low", 30), ("low", None)):
        app.send_task("depth.later", (), countdown=countdown, queue=level)
    queues = {q["queue"]: q for q in StatsStore(runtime_of(app)).queues()}
    assert (queues["normal"]["scheduled"], queues["normal"]["depth"]) == (2, 0)
    assert (queues["low"]["scheduled"], queues["low"]["depth"]) == (1, 1)
    assert queues["critical"]["scheduled"] == 0


def test_amqp_depth_by_passive_declare() -> None:
    servers.require("rabbitmq")
    name = f"taskyard-test-depth-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
    with Connection(servers.RABBITMQ_URL) as conn:
        bound = queue(conn.default_channel)
        bound.declare()
        try:
            producer = conn.Producer()
            for i in range(3):
                producer.publish(
                    {"i": i}, exchange=queue.exchange, routing_key=name, declare=[queue]
                )

            def depths_now() -> dict[str, Any]:
                return {d.queue: d for d in amqp_depths(servers.RABBITMQ_URL, [name, name + "-x"])}

            # Publishing is asynchronous (no confirms): the broker's count catches up shortly.
            wait_until(lambda: depths_now()[name].ready == 3, 10, 0.05, "3 messages counted")
            depths = depths_now()
            assert depths[name].ready == 3 and depths[name].depth == 3
            assert depths[name].reserved_known is False
            assert depths[name + "-x"].depth == 0  # missing queue: empty, not an error
        finally:
            bound.delete()
            queue.exchange(conn.default_channel).delete()


def test_store_reads_rabbitmq_broker_counts(make_app: Any) -> None:
    servers.require("rabbitmq")
    app = make_app("depth-amqp", broker_url=servers.RABBITMQ_URL)
    store = StatsStore(runtime_of(app))
    queues = store.queues()
    assert [q["queue"] for q in queues] == ["critical", "high", "normal", "low", "batch"]
    assert all(q["reserved_known"] is False and q["depth"] == q["ready"] >= 0 for q in queues)
    # Celery's ETA handling on RabbitMQ: a worker holds them; the broker counts none apart.
    assert all(q["scheduled"] is None for q in queues)
    assert store.check_ready()["broker"] is None


def test_the_stats_collection_does_not_count_itself(redis_client: redis.Redis) -> None:
    """Reserved on the critical queue while it runs, the collection's own message is not a
    critical task waiting (it showed depth 1 on every snapshot)."""
    from taskyard.monitoring.queues import STATS_TASK, UNACKED_KEY, redis_depths

    def reserved(tag: str, task: str) -> str:
        message = {
            "headers": {"task": task, "id": tag},
            "properties": {"delivery_tag": tag, "delivery_info": {"routing_key": "critical"}},
        }
        return json.dumps([message, "", "critical"])

    redis_client.hset(UNACKED_KEY, "a", reserved("a", STATS_TASK))
    redis_client.hset(UNACKED_KEY, "b", reserved("b", "bdc.tasks.revoke_sessions"))
    (critical,) = redis_depths(redis_client, ["critical"])
    assert critical.reserved == 1
