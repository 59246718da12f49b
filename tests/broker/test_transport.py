"""taskyard's Redis transport on a real Redis, through kombu: the fetch, acks, leases.

The kombu names the transport relies on are declared in its ``SEAMS`` (tests/test_seams.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from taskyard.broker import REDIS_TRANSPORT, SENTINEL_TRANSPORT, broker_transport_config
from taskyard.broker.transport import Channel, SentinelTransport, Transport
from taskyard.keys import Keys
from taskyard.testing import wait_until
from tests import servers
from tests.servers import RedisServer

EXCHANGE = Exchange("taskyard", "direct")
LEVELS = ("critical", "high", "normal")
OPTIONS = {"queue_order_strategy": "priority", "reservation_lease": 30}


def _queues() -> list[Queue]:
    return [Queue(name, EXCHANGE, routing_key=name) for name in LEVELS]


@pytest.fixture
def connect(redis_client: redis.Redis) -> Iterator[Any]:
    """Factory of kombu connections on the suite's database with taskyard's transport."""
    opened: list[Connection] = []

    def factory(url: str = servers.REDIS_URL, **options: Any) -> Connection:
        conn = Connection(url, transport=Transport, transport_options={**OPTIONS, **options})
        opened.append(conn)
        return conn

    yield factory
    for conn in opened:
        conn.release()


def _declare(conn: Connection) -> Producer:
    channel = conn.channel()
    for queue in _queues():
        queue(channel).declare()
    return Producer(channel, EXCHANGE)


def _drain(
    conn: Connection, queues: list[Queue], count: int, ack: bool = True, timeout_s: float = 10
) -> list[Any]:
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append((body, message))
        if ack:
            message.ack()

    consumer = Consumer(conn.channel(), queues, callbacks=[on_message])
    consumer.qos(prefetch_count=count)
    deadline = time.monotonic() + timeout_s
    with consumer:
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
    return got


# --- selection by the app's configuration ---------------------------------------------------
def test_app_configuration_selects_the_transport(make_app: Any) -> None:
    app = make_app("sel")
    assert app.conf.broker_transport == REDIS_TRANSPORT
    assert app.conf.broker_transport_options["reservation_lease"] == 30.0
    with app.connection_for_write() as conn:
        # Celery's _connection passes broker_transport to kombu.Connection, which keeps it over
        # the URL scheme (kombu.Connection.__init__).
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        assert channel.visibility_timeout == 30.0  # the lease replaces visibility_timeout


def test_urls_map_to_transports() -> None:
    assert broker_transport_config("redis://h:6379/0") == {"broker_transport": REDIS_TRANSPORT}
    assert broker_transport_config("sentinel://h:26379")["broker_transport"] == SENTINEL_TRANSPORT
    assert broker_transport_config("rediss://h:6380/0")["broker_transport"] == REDIS_TRANSPORT
    assert broker_transport_config("amqp://guest@h//") == {}
    assert broker_transport_config("redis+socket:///tmp/r.sock") == {}


def test_leases_off_keeps_the_visibility_timeout(make_app: Any) -> None:
    app = make_app("nolease", reservation_lease_s=0, visibility_timeout_s=5000)
    with app.connection_for_write() as conn:
        assert conn.default_channel.visibility_timeout == 5000


def test_one_client_per_channel_for_every_command(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    channel = producer.channel
    client = channel.client
    with channel.conn_or_acquire() as acquired:
        assert acquired is client
    for i in range(5):
        producer.publish({"i": i}, routing_key="normal")
    assert channel.client is client
    assert channel.fetch_client is not client  # the blocking reads have their own connection
    assert redis_client.llen("normal") == 5


# --- fetch --------------------------------------------------------------------------------
def test_strict_queue_order_across_priority_sub_lists(
    connect: Any, redis_client: redis.Redis
) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"m": "normal-0"}, routing_key="normal", priority=0)
    producer.publish({"m": "high-9"}, routing_key="high", priority=9)
    producer.publish({"m": "high-0"}, routing_key="high", priority=0)
    producer.publish({"m": "critical-9"}, routing_key="critical", priority=9)
    producer.publish({"m": "critical-3"}, routing_key="critical", priority=3)
    # Sub-lists as kombu names them (Channel._q_for_pri).
    assert redis_client.llen("critical\x06\x169") == 1
    assert redis_client.llen("critical\x06\x163") == 1
    got = _drain(conn, _queues(), 5)
    assert [body["m"] for body, _ in got] == [
        "critical-3",
        "critical-9",
        "high-0",
        "high-9",
        "normal-0",
    ]


def test_a_fetched_message_is_recorded_as_kombu_records_it(
    connect: Any, redis_client: redis.Redis
) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"x": 1}, routing_key="high")
    before = time.time()
    ((_body, message),) = _drain(conn, _queues(), 1, ack=False)
    tag = message.delivery_tag
    raw, exchange, routing_key = json.loads(redis_client.hget("unacked", tag))
    assert (exchange, routing_key) == ("taskyard", "high")
    assert raw["properties"]["delivery_tag"] == tag
    assert before - 1 <= redis_client.zscore("unacked_index", tag) <= time.time() + 1
    assert redis_client.llen("high") == 0
    # kombu's own restore path reads that record back into the queue.
    message.channel.qos.restore_by_tag(tag)
    assert redis_client.llen("high") == 1
    assert redis_client.hlen("unacked") == 0


def test_fetch_pops_several_when_prefetch_allows(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    for i in range(20):
        producer.publish({"i": i}, routing_key="normal")
    got = _drain(conn, _queues(), 20)
    assert [body["i"] for body, _ in got] == list(range(20))
    assert redis_client.hlen("unacked") == 0


def test_fetch_budget_sizes_batches_by_observed_delivery_time(connect: Any) -> None:
    channel = connect(fetch_budget=0.01, fetch_batch=16).channel()
    channel.qos.prefetch_count = 16
    assert channel.fetch_want() == 4  # nothing timed yet: a quarter of the batch
    for _ in range(20):
        channel._observe_delivery(0.008, 16)  # 0.5 ms a message: 20 fit in 10 ms
    assert channel.fetch_want() == 16  # grown to the batch (and prefetch) limit
    channel._observe_delivery(0.010, 2)  # 5 ms a message: shrinks at once
    assert channel.fetch_want() == 2
    channel._observe_delivery(0.001, 2)  # faster again: grows back a quarter at a time
    assert channel.fetch_want() == 2
    for _ in range(30):
        channel._observe_delivery(0.001, 2)
    assert channel.fetch_want() == 16
    channel._observe_delivery(1.0, 1)  # one long task: one message per fetch
    assert channel.fetch_want() == 1
    channel.qos.prefetch_count = 3
    channel._per_message_s = 1e-5
    assert channel.fetch_want() == 3  # the prefetch still bounds it


def test_a_fetch_is_due_at_half_free_or_one_free_after_an_ack_delay(connect: Any) -> None:
    # An ack delay of a minute: "just sent" stays true however slowly this test runs.
    channel = connect(ack_flush_delay=60.0).channel()
    qos = channel.qos
    qos.prefetch_count = 8
    assert qos.fetch_due()  # nothing held
    for i in range(8):
        qos._delivered[f"t{i}"] = None
    channel._brpop_sent_at = time.monotonic()
    assert not qos.fetch_due()  # all eight held
    qos._dirty.add("t0")
    assert not qos.fetch_due()  # one free, the last fetch just sent: wait for more
    channel._brpop_sent_at = time.monotonic() - 61
    assert qos.fetch_due()  # one free for longer than the ack delay: fetch it
    channel._brpop_sent_at = time.monotonic()
    qos._dirty.update({"t1", "t2", "t3"})
    assert qos.fetch_due()  # half free: fetch at once
    qos._dirty.clear()
    channel._brpop_sent_at = time.monotonic() - 3600
    assert not qos.fetch_due()  # nothing free however long ago the last fetch was


def test_fetch_without_budget_takes_what_prefetch_allows(connect: Any) -> None:
    channel = connect(fetch_budget=0, fetch_batch=16).channel()
    channel.qos.prefetch_count = 10
    channel._observe_delivery(1.0, 1)
    assert channel.fetch_want() == 10


def test_drain_with_a_fetch_budget_delivers_every_message_in_order(
    connect: Any, redis_client: redis.Redis
) -> None:
    conn = connect(fetch_budget=0.01)
    producer = _declare(conn)
    for i in range(50):
        producer.publish({"i": i}, routing_key="normal")
    got = _drain(conn, _queues(), 50)
    assert [body["i"] for body, _ in got] == list(range(50))
    assert redis_client.hlen("unacked") == 0


def test_idle_consumer_is_woken_by_a_publish(connect: Any) -> None:
    # The idle read's timeout fallback far away (30 s, not 1 s): the message arriving well
    # before it shows the publish woke the reader, however slow a loaded machine is.
    conn = connect(brpop_timeout=30)
    _declare(conn)
    sender = connect()
    producer = _declare(sender)
    received: list[float] = []

    def publish_later() -> None:
        time.sleep(0.4)
        received.append(time.monotonic())
        producer.publish({"late": 1}, routing_key="normal")

    thread = threading.Thread(target=publish_later)
    thread.start()
    got = _drain(conn, _queues(), 1, timeout_s=25)
    arrived = time.monotonic()
    thread.join()
    assert got and got[0][0] == {"late": 1}
    # The XREAD on the wake stream returns at once (milliseconds); only the fallback takes 30 s.
    assert arrived - received[0] < 15


def test_undecodable_items_are_kept_aside_not_lost(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    redis_client.lpush("normal", b"not json", json.dumps({"no": "properties"}))
    producer.publish({"ok": 1}, routing_key="normal")
    got = _drain(conn, _queues(), 1)
    assert [body for body, _ in got] == [{"ok": 1}]
    assert sorted(redis_client.lrange(Keys().broker_quarantine(), 0, -1)) == sorted(
        [b"not json", json.dumps({"no": "properties"}).encode()]
    )


def test_basic_get_records_and_no_ack_does_not(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"a": 1}, routing_key="normal")
    producer.publish({"b": 2}, routing_key="normal")
    channel = conn.channel()
    message = channel.basic_get("normal")
    assert message is not None and redis_client.hexists("unacked", message.delivery_tag)
    message.ack()
    assert redis_client.hlen("unacked") == 0
    assert channel.basic_get("normal", no_ack=True) is not None
    assert redis_client.hlen("unacked") == 0
    assert channel.basic_get("normal") is None


# --- acks ---------------------------------------------------------------------------------
class _Loop:
    """Stand-in for Celery's hub: records the timers the channel asks for."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.timers.append((delay, callback))


def test_acks_on_the_loop_thread_ride_on_the_next_fetch(
    connect: Any, redis_client: redis.Redis
) -> None:
    conn = connect()
    producer = _declare(conn)
    for i in range(3):
        producer.publish({"i": i}, routing_key="normal")
    channel = conn.channel()
    first, second = channel.basic_get("normal"), channel.basic_get("normal")
    loop = _Loop()
    transport = conn.transport
    transport._taskyard_loop, transport._taskyard_loop_thread = loop, threading.get_ident()
    first.ack()
    second.ack()
    assert redis_client.hlen("unacked") == 2  # pending, not yet applied
    assert len(loop.timers) == 1 and loop.timers[0][0] == pytest.approx(0.005)
    third = channel.basic_get("normal")  # carries both acks
    assert set(redis_client.hkeys("unacked")) == {third.delivery_tag.encode()}
    assert redis_client.zcard("unacked_index") == 1
    third.ack()
    loop.timers[0][1]()  # the timer fallback applies what no fetch carried
    assert redis_client.hlen("unacked") == 0


def test_acks_from_another_thread_apply_at_once(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    channel = conn.channel()
    message = channel.basic_get("normal")
    transport = conn.transport
    transport._taskyard_loop, transport._taskyard_loop_thread = _Loop(), -1
    thread = threading.Thread(target=message.ack)
    thread.start()
    thread.join()
    assert redis_client.hlen("unacked") == 0


def test_close_applies_pending_acks(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    channel = conn.channel()
    message = channel.basic_get("normal")
    transport = conn.transport
    transport._taskyard_loop, transport._taskyard_loop_thread = _Loop(), threading.get_ident()
    message.ack()
    assert redis_client.hlen("unacked") == 1
    channel.close()
    assert redis_client.hlen("unacked") == 0
    assert redis_client.llen("normal") == 0  # acked, so not restored at close


def test_reject_with_requeue_keeps_kombu_semantics(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    producer.publish({"i": 2}, routing_key="normal")
    channel = conn.channel()
    message = channel.basic_get("normal")
    message.reject(requeue=True)
    assert redis_client.hlen("unacked") == 0
    # kombu LPUSHes a requeued message: consumers pop from the other end, so it comes last.
    assert channel.basic_get("normal").payload == {"i": 2}
    again = channel.basic_get("normal")
    assert again.payload == {"i": 1}
    again.reject(requeue=False)
    assert redis_client.hlen("unacked") == 1 and redis_client.llen("normal") == 0


# --- leases -------------------------------------------------------------------------------
def test_renewal_rewrites_held_scores_only(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    producer.publish({"i": 2}, routing_key="normal")
    channel = conn.channel()
    held, done = channel.basic_get("normal"), channel.basic_get("normal")
    redis_client.zadd("unacked_index", {held.delivery_tag: 1.0, done.delivery_tag: 1.0})
    done.ack()
    assert channel.renew_leases() == 1
    assert redis_client.zscore("unacked_index", held.delivery_tag) > time.time() - 5
    assert redis_client.zscore("unacked_index", done.delivery_tag) is None  # ZADD XX


def test_kombu_sweep_restores_an_expired_lease(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect(reservation_lease=1)
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="high", priority=6)
    dead = conn.channel()
    assert dead.basic_get("high") is not None  # held by a "worker" that never renews
    time.sleep(1.3)
    survivor = connect(reservation_lease=1).channel()
    # kombu's own sweep, as its event-loop timer calls it.
    survivor.qos.restore_visible(num=None, interval=1)
    assert redis_client.llen("high\x06\x166") == 1  # back in its queue and priority sub-list
    assert redis_client.hlen("unacked") == 0
    assert redis_client.xlen(Keys().wake_stream("high")) >= 1  # idle workers are woken


def test_maintenance_thread_renews_while_a_consumer_holds(
    connect: Any, redis_client: redis.Redis
) -> None:
    conn = connect(reservation_lease=0.6)
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    got = _drain(conn, _queues(), 1, ack=False)
    tag = got[0][1].delivery_tag
    first = redis_client.zscore("unacked_index", tag)
    wait_until(
        lambda: redis_client.zscore("unacked_index", tag) > first, 3, 0.05, "a lease renewal"
    )


# --- key prefix and Sentinel ------------------------------------------------------------------
def test_global_keyprefix(connect: Any, redis_client: redis.Redis) -> None:
    conn = connect(global_keyprefix="pfx:", reservation_lease=1)
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    assert redis_client.llen("pfx:normal") == 1
    assert redis_client.xlen("pfx:" + Keys().wake_stream("normal")) == 1
    channel = conn.channel()
    message = channel.basic_get("normal")
    assert redis_client.hexists("pfx:unacked", message.delivery_tag)
    assert redis_client.zscore("pfx:unacked_index", message.delivery_tag) is not None
    time.sleep(1.2)
    connect(global_keyprefix="pfx:", reservation_lease=1).channel().qos.restore_visible(
        num=None, interval=1
    )
    assert redis_client.llen("pfx:normal") == 1
    got = _drain(conn, _queues(), 1)
    assert got[0][0] == {"i": 1}
    assert redis_client.hlen("pfx:unacked") == 0
    assert not redis_client.exists("normal", "unacked")


@pytest.fixture
def sentinel_url(redis_server: Callable[..., RedisServer]) -> str:
    """A real Redis master and a real Sentinel watching it, on spare ports."""
    master = redis_server()
    sentinel = redis_server(
        "--sentinel", conf=f"sentinel monitor tymaster 127.0.0.1 {master.port} 1\n"
    )
    return f"sentinel://127.0.0.1:{sentinel.port}/0"


def test_sentinel(sentinel_url: str) -> None:
    conn = Connection(
        sentinel_url,
        transport=SentinelTransport,
        transport_options={**OPTIONS, "master_name": "tymaster"},
    )
    try:
        producer = _declare(conn)
        producer.publish({"via": "sentinel"}, routing_key="critical")
        got = _drain(conn, _queues(), 1)
        assert got[0][0] == {"via": "sentinel"}
        client = producer.channel.client
        assert client.hlen("unacked") == 0
    finally:
        conn.release()


def test_sentinel_app_configuration(make_app: Any) -> None:
    app = make_app("sent", broker_url="sentinel://127.0.0.1:26399/0")
    assert app.conf.broker_transport == SENTINEL_TRANSPORT


# --- the fast profile -------------------------------------------------------------------------
def test_fast_profile_arguments_and_limits(make_app: Any) -> None:
    from taskyard.config import load_settings
    from taskyard.errors import ConfigurationError
    from taskyard.workers.profiles import (
        FAST_QUEUES_FROM,
        default_fast_processes,
        fast_worker_argvs,
        get_profile,
        hard_time_limited_tasks,
        split_processes,
    )

    profile = get_profile(load_settings(), FAST_QUEUES_FROM)
    argvs = fast_worker_argvs("bdc", profile, 2, ("--loglevel", "INFO"))
    assert [argv[argv.index("-n") + 1] for argv in argvs] == ["fast1@%h", "fast2@%h"]
    assert all(argv[argv.index("-P") + 1] == "solo" for argv in argvs)
    assert argvs[0][argvs[0].index("-Q") + 1] == "critical,high,normal,low,batch"
    assert argvs[0][argvs[0].index("--prefetch-multiplier") + 1] == "1"
    reserving = fast_worker_argvs("bdc", profile, 1, ("--prefetch-multiplier", "2"), prefetch=4)
    # The user's own --prefetch-multiplier comes last, so Celery's option parsing takes it.
    assert reserving[0][-4:] == ["--prefetch-multiplier", "4", "--prefetch-multiplier", "2"]
    assert split_processes(("-c", "3", "--loglevel", "INFO"), 2) == (3, ("--loglevel", "INFO"))
    assert split_processes(("--concurrency=4",), 2) == (4, ())
    with pytest.raises(ConfigurationError, match="whole number"):
        split_processes(("-c", "many"), 2)
    with pytest.raises(ConfigurationError, match="at least 1"):
        fast_worker_argvs("bdc", profile, 0)
    # Without -c: 1.5 processes per core, rounded up; the setting changes it.
    assert [default_fast_processes(load_settings(), cores) for cores in (1, 2, 4, 5)] == [
        2,
        3,
        6,
        8,
    ]
    one_each = load_settings(fast_processes_per_core=1)
    assert [default_fast_processes(one_each, cores) for cores in (1, 2, 16)] == [1, 2, 16]
    assert default_fast_processes(load_settings()) >= 1  # this machine's cores
    app = make_app("limits")

    @app.task(name="limits.bounded", time_limit=5, shared=False)
    def bounded() -> None: ...

    @app.task(name="limits.free", shared=False)
    def free() -> None: ...

    assert hard_time_limited_tasks(app) == ["limits.bounded"]


# --- monitoring reads the same records --------------------------------------------------------
def test_queue_depth_counts_fetch_recorded_reservations(
    connect: Any, redis_client: redis.Redis
) -> None:
    from taskyard.monitoring.queues import redis_depths

    conn = connect()
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="high", priority=3)
    producer.publish({"i": 2}, routing_key="high")
    producer.publish({"i": 3}, routing_key="normal")
    held = conn.channel().basic_get("high")
    assert held is not None
    depths = {d.queue: d for d in redis_depths(redis_client, LEVELS)}
    assert (depths["high"].ready, depths["high"].reserved) == (1, 1)
    assert (depths["normal"].ready, depths["normal"].reserved) == (1, 0)
    held.ack()
    assert {d.queue: d.reserved for d in redis_depths(redis_client, LEVELS)}["high"] == 0


def _deep_envelope(depth: int, tag: str) -> bytes:
    """A kombu message whose headers nest ``depth`` lists deep: Redis' cjson decodes up to 1,000
    levels, Python's decoder fails short of its recursion limit."""
    headers = '{"deep":' + "[" * depth + "1" + "]" * depth + "}"
    return (
        '{"body":"e30=","content-encoding":"utf-8","content-type":"application/json",'
        f'"headers":{headers},"properties":{{"delivery_tag":"{tag}","body_encoding":"base64",'
        '"delivery_info":{"exchange":"taskyard","routing_key":"normal"},"priority":0}}'
    ).encode()


@pytest.mark.parametrize("depth", [300, 970, 998])
def test_a_message_nested_past_the_decoder_is_kept_aside(
    connect: Any, redis_client: redis.Redis, depth: int
) -> None:
    conn = connect()
    producer = _declare(conn)
    producer.publish({"before": 1}, routing_key="normal")
    redis_client.lpush("normal", _deep_envelope(depth, "deep-tag"))
    producer.publish({"after": 1}, routing_key="normal")
    got = _drain(conn, _queues(), 2)
    assert [body for body, _ in got] == [{"before": 1}, {"after": 1}]
    assert redis_client.lrange(Keys().broker_quarantine(), 0, -1) == [
        _deep_envelope(depth, "deep-tag")
    ]
    assert redis_client.hlen("unacked") == 0
    # The decoder's limit is server-wide: the script puts Redis' own back.
    assert redis_client.eval("return cjson.decode_max_depth()", 0) == 1000


def test_the_sweep_sets_aside_a_record_it_cannot_read_and_restores_the_rest(
    connect: Any, redis_client: redis.Redis
) -> None:
    # What a worker SIGKILLed while holding them leaves: records past their lease, the oldest
    # a good message, a newer one that no decoder takes (written before any depth check).
    conn = connect(reservation_lease=1)
    producer = _declare(conn)
    producer.publish({"i": 1}, routing_key="normal")
    dead = conn.channel()
    held = dead.basic_get("normal")
    assert held is not None
    raw = _deep_envelope(995, "bad-tag").decode()
    redis_client.hset("unacked", "bad-tag", f'[{raw},"taskyard","normal"]')
    redis_client.zadd("unacked_index", {"bad-tag": time.time() - 5})
    redis_client.zadd("unacked_index", {held.delivery_tag: time.time() - 10})
    survivor = connect(reservation_lease=1).channel()
    survivor.qos.restore_visible(num=None, interval=1)
    assert redis_client.llen("normal") == 1  # the older good message is back
    assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
    kept = redis_client.lrange(Keys().broker_quarantine(), 0, -1)
    assert len(kept) == 1 and b"bad-tag" in kept[0]


def test_an_unreadable_fetched_message_never_raises_out_of_the_loop(connect: Any) -> None:
    # The script already keeps such messages aside; this is the loop's own last line.
    channel = connect().channel()
    plan = channel._plan(("normal",))
    with pytest.raises(Empty):
        channel._deliver_fetched(plan, [b"1", _deep_envelope(5000, "t")])


def test_active_queues_follow_consume_and_cancel(make_app: Any) -> None:
    app = make_app("active-queues")
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for name in ("aq-one", "aq-two"):
            Queue(name, channel=channel).declare()
        fanout = Queue("aq-fan", Exchange("aq-fanout", type="fanout"), channel=channel)
        fanout.declare()
        assert channel.active_queues == []
        channel.basic_consume("aq-one", False, lambda m: None, "t1")
        channel.basic_consume("aq-fan", False, lambda m: None, "t2")
        assert channel.active_queues == ["aq-one"]  # fanout queues are listened to, not fetched
        first = channel.active_queues
        assert channel.active_queues is first  # not rebuilt while nothing changed
        channel.basic_consume("aq-two", False, lambda m: None, "t3")
        assert channel.active_queues == ["aq-one", "aq-two"]
        channel.basic_cancel("t1")
        assert channel.active_queues == ["aq-two"]
        channel.basic_cancel("t2")
        channel.basic_cancel("t3")
        assert channel.active_queues == []
