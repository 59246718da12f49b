"""Job control without workers: options checked at import, locks taken atomically at publish
(many producer processes), throttle windows, debounce replacing the pending message, bulk
enqueue (ids in order, a refused chunk publishes nothing), cancel records read by the fetch."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
import redis

from taskyard import priority_task
from taskyard.broker.control.jobs import announce_lease
from taskyard.broker.transport import Channel
from taskyard.errors import BulkPublishError, ConfigurationError
from taskyard.keys import Keys
from taskyard.testing import child_env, run_python, wait_until
from tests import servers

KEYS = Keys()


def _queued(client: redis.Redis, queue: str = "normal") -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"unique": "always"}, "unique='always'"),
        ({"throttle": 0}, "throttle=0"),
        ({"debounce": -1}, "debounce=-1"),
        ({"unique": "active", "throttle": 5}, "cannot be combined"),
        ({"unique_key": ("a",)}, "needs unique="),
        ({"unique": "active", "unique_key": ("nope",)}, "'nope', which is not an argument"),
        ({"unique": "active", "unique_key": 3}, "unique_key=3"),
    ],
)
def test_job_options_are_checked_at_import(options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigurationError, match=None) as info:

        @priority_task(**options)
        def task(a: int) -> None: ...

    assert needle in str(info.value)


def test_unique_active_dedups_on_both_paths_and_tells_the_caller(
    make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    first = jobs.once.delay("k")
    again = jobs.once.delay("k")  # the fast path
    delayed = jobs.once.apply_async(("k",), countdown=30)  # Celery's path (an option)
    other = jobs.once.delay("other")
    assert first.deduplicated is False and other.deduplicated is False
    assert again.deduplicated is True and again.id == first.id
    assert delayed.deduplicated is True and delayed.id == first.id
    assert [m["headers"]["id"] for m in _queued(redis_client)] == [other.id, first.id]
    counts = redis_client.hgetall(KEYS.jobs_counts())
    assert counts[f"{jobs.once.name}\x1fdeduplicated".encode()] == b"2"


def test_unique_key_names_pick_the_arguments(make_app: Any, redis_client: redis.Redis) -> None:
    from tests.apps import jobs

    make_app("jobs")
    a = jobs.queued_only.delay("k", 1)
    b = jobs.queued_only.delay("k", n=2)
    c = jobs.queued_only.delay("j", 1)
    assert b.deduplicated and b.id == a.id
    assert not c.deduplicated


def test_eight_producers_agree_on_one_message(redis_client: redis.Redis) -> None:
    env = {"TASKYARD_REDIS_URL": servers.REDIS_URL}
    code = (
        "import redis\nfrom tests.apps import jobs\n"
        f"c = redis.Redis.from_url({servers.REDIS_URL!r})\n"
        "ids = [jobs.once.delay('same').id for _ in range(500)]\n"
        "c.rpush('test:ids', *ids)\n"
    )
    import subprocess
    import sys

    from taskyard.testing import ROOT

    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=child_env(env), cwd=ROOT)
        for _ in range(8)
    ]
    for proc in procs:
        assert proc.wait(180) == 0
    ids = [raw.decode() for raw in redis_client.lrange("test:ids", 0, -1)]
    assert len(ids) == 4000
    assert len(set(ids)) == 1
    queued = _queued(redis_client)
    assert [m["headers"]["id"] for m in queued] == ids[:1]


def test_throttle_window_then_a_new_message(redis_client: redis.Redis) -> None:
    env = {"TASKYARD_REDIS_URL": servers.REDIS_URL}
    run_python(
        env,
        "import time, redis\nfrom tests.apps import jobs\n"
        f"c = redis.Redis.from_url({servers.REDIS_URL!r})\n"
        "first = jobs.throttled.delay('x'); t0 = time.monotonic()\n"
        "lock = next(iter(c.scan_iter('taskyard:jobs:lock:*')))\n"
        "c.set('test:ttl', c.pttl(lock))\n"
        "inside = [jobs.throttled.delay('x') for _ in range(5)]\n"
        "assert all(r.deduplicated and r.id == first.id for r in inside)\n"
        "while True:\n"
        "    r = jobs.throttled.delay('x')\n"
        "    if not r.deduplicated: break\n"
        "    assert time.monotonic() - t0 < 30, 'throttle window never ended'\n"
        "    time.sleep(0.05)\n"
        "c.set('test:gap', time.monotonic() - t0)\n",
    )
    gap = float(redis_client.get("test:gap") or 0)
    # The window (2 s) is the lock's TTL in Redis; the caller's clock only sees it end some
    # time after its own call returned (a loaded machine delays that return), so the gap is
    # bounded loosely from below and not at all from above.
    assert 0 < int(redis_client.get("test:ttl") or 0) <= 2000
    assert gap >= 0.5
    assert len(_queued(redis_client)) == 2


def test_debounce_replaces_the_pending_message(make_app: Any, redis_client: redis.Redis) -> None:
    from tests.apps import jobs

    make_app("jobs")
    calls = [jobs.debounced.delay("k", value) for value in (1, 2, 3)]
    assert len({c.id for c in calls}) == 3
    members = redis_client.zrange(KEYS.delayed("normal"), 0, -1, withscores=True)
    assert len(members) == 1
    member, due_ms = members[0]
    message = json.loads(member.decode().partition(":")[2])
    assert message["headers"]["id"] == calls[-1].id
    assert due_ms / 1000 >= time.time() + 0.5  # pushed back by the last call
    info = redis_client.hgetall(KEYS.cancel_info())
    assert {json.loads(v)["outcome"] for v in info.values()} == {"superseded"}
    assert {k.decode() for k in info} == {calls[0].id, calls[1].id}


def test_delay_many_keeps_order_and_dedups(make_app: Any, redis_client: redis.Redis) -> None:
    from tests.apps import jobs

    make_app("jobs")
    ids = jobs.noop.delay_many((i,) for i in range(2500))
    assert len(ids) == len(set(ids)) == 2500
    queued = _queued(redis_client)
    # LPUSH at the far end: the consuming end (the right) holds the first call.
    assert [m["headers"]["id"] for m in reversed(queued)] == ids
    assert [json.loads(__import__("base64").b64decode(m["body"]))[0][0] for m in queued[-3:]] == [
        2,
        1,
        0,
    ]
    # The same message as .delay() builds, but for the ids, the delivery tag and the send time.
    redis_client.delete("normal")
    jobs.queued_only.delay("it's", n=7)
    redis_client.delete(*redis_client.scan_iter(f"{KEYS.jobs_prefix()}lock:*"))
    jobs.queued_only.apply_many([(("it's",), {"n": 7})])
    one, many = (json.loads(raw) for raw in redis_client.lrange("normal", 0, -1)[::-1])
    for message in (one, many):
        message["headers"].pop("taskyard_sent_at", None)
        for field in ("id", "root_id"):
            message["headers"].pop(field)
        for field in ("correlation_id", "delivery_tag"):
            message["properties"].pop(field)
    assert many == one
    unique = jobs.once.delay_many([("a",), ("b",), ("a",)])
    assert unique[0] == unique[2] != unique[1]
    high = jobs.noop.apply_many([((1,), {}), ((2,), {})], level="high")
    assert [m["headers"]["id"] for m in reversed(_queued(redis_client, "high"))] == high


def test_delay_many_refuses_a_chunk_before_publishing_any_of_it(
    make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    make_app("jobs")
    n = 100_000
    calls = ((math.nan if i == n - 1 else i,) for i in range(n))
    with pytest.raises(BulkPublishError) as info:
        jobs.noop.delay_many(calls)
    chunk = 1000
    assert info.value.published == n - chunk
    assert info.value.index == n - 1
    assert f"{n - chunk} call(s) before its chunk were published" in str(info.value)
    assert redis_client.llen("normal") == n - chunk


def test_cancel_records_are_read_by_the_fetch(make_app: Any, redis_client: redis.Redis) -> None:
    from tests.apps import jobs

    app = make_app("cancels")
    keep = jobs.record.delay(1)
    drop = jobs.record.delay(2)
    locked = jobs.once.delay("held")
    from taskyard.broker.control.service import control_of
    from taskyard.runtime import runtime_of

    control = control_of(app, runtime_of(app))
    assert control.cancel([drop.id, locked.id], by="test") == 2
    assert control.cancel([drop.id], by="again") == 0
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, Channel)
        got = []
        for _ in range(5):
            message = channel.basic_get("normal")
            if message is None:
                break
            got.append(message.headers["id"])
            message.ack()
    assert got == [keep.id]
    for task_id in (drop.id, locked.id):
        record = control.store.record(task_id)
        assert record is not None and record["outcome"] == "dropped" and record["by"] == "test"
    # The cancelled message's unique lock went with it: a new call publishes.
    assert not jobs.once.delay("held").deduplicated
    assert redis_client.hget(KEYS.jobs_counts(), f"{jobs.record.name}\x1fcancelled") == b"1"


def test_active_lock_is_leased_at_reservation_and_released_at_ack(
    make_app: Any, redis_client: redis.Redis
) -> None:
    from tests.apps import jobs

    app = make_app("leases", reservation_lease_s=5)
    sent = jobs.once.delay("x")
    lock = next(iter(redis_client.scan_iter(f"{KEYS.jobs_prefix()}lock:*")))
    assert redis_client.pttl(lock) > 60_000  # unique_ttl_s while it waits
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        # A consuming channel announces its lease when it starts (basic_get does not consume).
        announce_lease(channel)
        message = channel.basic_get("normal")
        assert message is not None and message.headers["id"] == sent.id
        assert 0 < redis_client.pttl(lock) <= 5000  # the reservation's lease now
        assert jobs.once.delay("x").deduplicated  # still held while it runs
        message.ack()
        channel._flush_acks()
    wait_until(lambda: not redis_client.exists(lock), 10, 0.05, "the lock to be released")
    assert redis_client.hlen(KEYS.unique_tags()) == 0
    assert not jobs.once.delay("x").deduplicated
