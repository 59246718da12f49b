"""Broker-side delays against a real Redis: parking, moving, racing movers, SCRIPT FLUSH."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.transport.redis import Channel

from taskyard.broker import delays
from taskyard.keys import Keys
from taskyard.testing import terminate, wait_until
from tests import servers

KEYS = Keys()


@pytest.fixture
def app(make_app: Any) -> Any:
    return make_app("delayunit")


def _messages(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def test_future_eta_waits_in_the_delayed_set_then_moves_to_its_queue(
    app: Any, redis_client: redis.Redis
) -> None:
    app.send_task("t.later", (1,), countdown=30, queue="normal")
    app.send_task("t.now", (2,), queue="normal")
    assert redis_client.zcard(KEYS.delayed("normal")) == 1
    assert [m["headers"]["task"] for m in _messages(redis_client, "normal")] == ["t.now"]
    assert redis_client.smembers(KEYS.delayed_queues()) == {b"normal"}
    ((_member, score),) = redis_client.zrange(KEYS.delayed("normal"), 0, -1, withscores=True)
    assert abs(score / 1000 - (time.time() + 30)) < 5

    assert delays.move_due(redis_client) == 0  # not due on the Redis clock
    assert delays.move_due(redis_client, now=time.time() + 31) == 1
    assert redis_client.zcard(KEYS.delayed("normal")) == 0
    moved = _messages(redis_client, "normal")[0]  # LPUSHed: the newest is first
    assert moved["headers"]["task"] == "t.later"
    # The ETA is gone (Celery would treat even a past one as a timer entry and over-prefetch);
    # the original stays readable.
    assert moved["headers"]["eta"] is None
    assert moved["headers"][delays.HEADER_ORIGINAL_ETA]
    assert delays.eta_timestamp(moved["headers"][delays.HEADER_ORIGINAL_ETA]) == pytest.approx(
        score / 1000, abs=0.001
    )


def test_past_and_missing_etas_go_straight_to_the_queue(
    app: Any, redis_client: redis.Redis
) -> None:
    app.send_task("t.past", (), eta=datetime.now(UTC) - timedelta(minutes=1), queue="high")
    app.send_task("t.plain", (), queue="high")
    assert redis_client.llen("high") == 2
    assert redis_client.exists(KEYS.delayed("high")) == 0


def test_message_priority_lands_on_its_sub_list(app: Any, redis_client: redis.Redis) -> None:
    app.send_task("t.pri", (), countdown=5, queue="low", priority=5)
    assert delays.move_due(redis_client, now=time.time() + 10) == 1
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        # kombu's own naming of a priority sub-list (the seam the mover relies on).
        target = channel._q_for_pri("low", channel.priority(5))
    assert target == f"low{Channel.sep}3"
    assert redis_client.llen(target) == 1 and redis_client.llen("low") == 0


def test_switched_off_keeps_celerys_behaviour(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app("delayoff", broker_delays=False)
    app.send_task("t.later", (), countdown=30, queue="normal")
    assert redis_client.llen("normal") == 1
    assert redis_client.exists(KEYS.delayed("normal")) == 0
    assert delays._settings_of(app)[0] is False


def test_rabbitmq_apps_run_no_mover(make_app: Any) -> None:
    app = make_app("delayamqp", broker_url=servers.RABBITMQ_URL)
    assert delays._settings_of(app)[0] is False
    assert delays.OPTION_ENABLED not in app.conf.broker_transport_options


def test_maybe_delay_refuses_without_the_apps_switch(redis_client: redis.Redis) -> None:
    # A plain Celery app runs no mover: nothing of it may be parked.
    plain = Celery("plain", broker=servers.REDIS_URL)
    message = {"headers": {"eta": "2999-01-01T00:00:00+00:00"}, "properties": {}}
    with plain.connection_for_write() as conn:
        assert delays.maybe_delay(redis_client, conn.default_channel, "normal", message) is False
    assert redis_client.exists(KEYS.delayed("normal")) == 0


def test_unreadable_eta_is_left_to_celery() -> None:
    assert delays.eta_timestamp("not a date") is None
    assert delays.eta_timestamp(None) is None
    assert delays.eta_timestamp("2030-01-01T00:00:00+00:00") == 1893456000.0


def test_namespace_and_global_keyprefix(make_app: Any, redis_client: redis.Redis) -> None:
    app = make_app(
        "delayprefix",
        namespace="ns2",
        broker_transport_options={
            **_redis_options(make_app),
            "global_keyprefix": "pfx:",
            delays.OPTION_NAMESPACE: "ns2",
        },
    )
    app.send_task("t.later", (), countdown=5, queue="batch")
    assert redis_client.zcard("pfx:ns2:delayed:batch") == 1
    assert redis_client.smembers("pfx:ns2:delayed") == {b"batch"}
    # A plain client given the prefix, as beat or a tool would use it.
    assert delays.move_due(redis_client, "ns2", global_keyprefix="pfx:", now=time.time() + 10) == 1
    assert redis_client.llen("pfx:batch") == 1
    app.send_task("t.later", (), countdown=5, queue="batch")
    with app.connection_for_write() as conn, conn.default_channel.conn_or_acquire() as client:
        # kombu's prefixing client: the mover takes its prefix from the client.
        assert client.global_keyprefix == "pfx:"
        assert delays.move_due(client, "ns2", now=time.time() + 10) == 1
    assert redis_client.llen("pfx:batch") == 2


def _redis_options(make_app: Any) -> dict[str, Any]:
    probe = make_app("probe")
    return dict(probe.conf.broker_transport_options)


def test_scheduled_counts(app: Any, redis_client: redis.Redis) -> None:
    for queue, n in (("normal", 3), ("low", 1)):
        for _ in range(n):
            app.send_task("t.later", (), countdown=60, queue=queue)
    assert delays.scheduled_counts(redis_client, ["normal", "low", "high"]) == {
        "normal": 3,
        "low": 1,
        "high": 0,
    }


def _fill(client: redis.Redis, queues: list[str], per_queue: int) -> None:
    due = int(time.time() * 1000) - 1000
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.sadd(KEYS.delayed_queues(), queue)
            for i in range(per_queue):
                body = json.dumps({"headers": {"id": f"{queue}-{i}"}, "properties": {}})
                pipe.zadd(KEYS.delayed(queue), {f"0:{body}": due + i % 50})
        pipe.execute()


def _race_process(url: str, rounds: int, out: Any) -> None:
    client = redis.Redis.from_url(url)
    total = 0
    for _ in range(rounds):
        total += delays.move_due(client)
    out.put(total)


def test_many_movers_at_once_move_each_message_once(redis_client: redis.Redis) -> None:
    queues = ["critical", "high", "normal", "low", "batch"]
    _fill(redis_client, queues, 1200)
    totals: list[int] = []
    lock = threading.Lock()

    def mover() -> None:
        client = redis.Redis.from_url(servers.REDIS_URL)
        n = sum(delays.move_due(client) for _ in range(20))
        with lock:
            totals.append(n)

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_race_process, args=(servers.REDIS_URL, 20, out)) for _ in range(3)
    ]
    threads = [threading.Thread(target=mover) for _ in range(6)]
    for p in processes:
        p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    totals.extend(out.get(timeout=60) for _ in processes)
    for p in processes:
        p.join(60)
    assert sum(totals) == 6000
    assert len([t for t in totals if t]) >= 1
    for queue in queues:
        ids = [m["headers"]["id"] for m in _messages(redis_client, queue)]
        assert len(ids) == 1200 and len(set(ids)) == 1200
        assert redis_client.zcard(KEYS.delayed(queue)) == 0


def test_oldest_due_is_consumed_first(redis_client: redis.Redis) -> None:
    base = int(time.time() * 1000) - 10_000
    redis_client.sadd(KEYS.delayed_queues(), "normal")
    redis_client.zadd(KEYS.delayed("normal"), {f'0:{{"n": {i}}}': base + i for i in (3, 1, 2)})
    delays.move_due(redis_client)
    # Consumers RPOP: the right end is the next message.
    assert [json.loads(x)["n"] for x in reversed(redis_client.lrange("normal", 0, -1))] == [1, 2, 3]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A redis-server of this test's own: SCRIPT FLUSH empties a whole server's script cache."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    try:
        wait_until(lambda: servers.answers(port), 10, message="private redis-server")
        yield client
    finally:
        client.close()
        terminate(process)


def test_mover_reloads_its_script_after_script_flush(private_redis: redis.Redis) -> None:
    _fill(private_redis, ["normal"], 3)
    assert delays.move_due(private_redis) == 3
    private_redis.script_flush()
    assert private_redis.script_exists(delays.MOVE.sha) == [False]
    _fill(private_redis, ["normal"], 2)
    assert delays.move_due(private_redis) == 2
    assert private_redis.llen("normal") == 5


def test_a_backlog_larger_than_one_script_call_moves_in_one_tick(redis_client: redis.Redis) -> None:
    _fill(redis_client, ["batch"], delays.MOVE_BATCH * 3 + 7)
    assert delays.move_due(redis_client) == delays.MOVE_BATCH * 3 + 7


def test_the_mover_reports_when_the_next_message_is_due(redis_client: redis.Redis) -> None:
    assert delays.move_due_next(redis_client) == (0, None)
    now = time.time()
    redis_client.sadd(KEYS.delayed_queues(), "normal", "low")
    redis_client.zadd(KEYS.delayed("normal"), {"0:{}": int((now + 5) * 1000)})
    redis_client.zadd(KEYS.delayed("low"), {"0:{}": int((now + 2) * 1000)})
    moved, next_in = delays.move_due_next(redis_client, now=now)
    assert moved == 0 and next_in == pytest.approx(2, abs=0.01)


def test_a_move_wakes_workers_idle_on_the_transports_wake_stream(
    app: Any, redis_client: redis.Redis
) -> None:
    app.send_task("t.later", (), countdown=5, queue="normal")
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        # taskyard's transport: idle workers block on XREAD of the queue's wake stream.
        wake_key = channel.wake_key("normal")
        maxlen = channel.wake_maxlen
    before = redis_client.xlen(wake_key)
    assert delays.move_due(redis_client, now=time.time() + 10, wake_maxlen=maxlen) == 1
    assert redis_client.xlen(wake_key) == before + 1
    # Into a list that already holds messages: nobody idles on it, no wake entry.
    app.send_task("t.later", (), countdown=5, queue="normal")
    assert delays.move_due(redis_client, now=time.time() + 10, wake_maxlen=maxlen) == 1
    assert redis_client.xlen(wake_key) == before + 1
