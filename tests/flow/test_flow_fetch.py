"""The fetch script's flow control on a real Redis, call by call (no worker): what is delivered,
what is held and where, slots, rates, pauses, fair share."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from taskyard.broker.lua import ACK_SCRIPT, FETCH_SCRIPT, RENEW_SCRIPT
from taskyard.flow.control import FlowStore
from taskyard.keys import Keys

PREFIX = "taskyard:"
KEYS = Keys("taskyard")
LISTS = ("critical", "normal")
WAKE = ("taskyard:wake:critical", "taskyard:wake:normal", KEYS.flow_wake())


def _message(task: str, tag: str, partition: str | None = None) -> str:
    headers: dict[str, Any] = {"task": task, "id": tag}
    if partition is not None:
        headers["taskyard_partition"] = partition
    return json.dumps(
        {
            "body": "",
            "headers": headers,
            "properties": {
                "delivery_tag": tag,
                "delivery_info": {"exchange": "taskyard", "routing_key": "normal"},
            },
        }
    )


def _push(client: redis.Redis, queue: str, *messages: str) -> None:
    for message in messages:
        client.lpush(queue, message)


def _fetch(
    client: redis.Redis, want: int = 10, acks: tuple[str, ...] = (), now: float | None = None
) -> tuple[list[str], list[Any]]:
    """(tags delivered, the raw reply) of one FETCH over critical, normal."""
    keys = ["unacked", "unacked_index", "quarantine", *LISTS, *WAKE]
    args = [PREFIX, repr(now or time.time()), len(LISTS), want, "1", len(acks), *acks]
    reply = FETCH_SCRIPT(client, keys, args)
    if reply[0] != 1:
        return [], reply
    tags = [json.loads(raw)["properties"]["delivery_tag"] for raw in reply[2::2]]
    return tags, reply


def _store(client: redis.Redis) -> FlowStore:
    return FlowStore(client, KEYS)


def test_nothing_configured_leaves_no_flow_keys(redis_client: redis.Redis) -> None:
    _push(redis_client, "normal", *(_message("t.plain", f"p{i}") for i in range(3)))
    tags, _ = _fetch(redis_client)
    assert tags == ["p0", "p1", "p2"]
    _fetch(redis_client, acks=tuple(tags))
    assert sorted(k.decode() for k in redis_client.keys("*")) == ["unacked_index"] or not any(
        k.decode().startswith("taskyard:flow") for k in redis_client.keys("*")
    )
    assert not any(k.decode().startswith("taskyard:flow") for k in redis_client.keys("*"))


def test_concurrency_holds_without_blocking_the_queue(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.capped": {"rate": None, "concurrency": 1, "partitioned": False}}, 30)
    _push(
        redis_client,
        "normal",
        _message("t.capped", "c0"),
        _message("t.capped", "c1"),
        _message("t.plain", "p0"),
        _message("t.capped", "c2"),
        _message("t.plain", "p1"),
    )
    tags, _ = _fetch(redis_client)
    # Within one reply, governed messages come after the list's others (served on leaving it).
    assert tags == ["p0", "p1", "c0"]
    assert redis_client.llen("normal") == 0
    held = store.held()
    assert [(h["task"], h["held"], h["reason"]) for h in held] == [("t.capped", 2, "concurrency")]
    assert store.held_by_queue(["normal"]) == {"normal": 2}
    # Nothing more while c0 holds the slot; its ack frees it in the same call.
    assert _fetch(redis_client)[0] == []
    assert _fetch(redis_client, acks=("c0",))[0] == ["c1"]
    assert _fetch(redis_client, acks=("c1",))[0] == ["c2"]
    assert store.status()[0]["running"] == 1


def test_slots_are_leased(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.capped": {"rate": None, "concurrency": 1, "partitioned": False}}, 5)
    _push(redis_client, "normal", _message("t.capped", "c0"), _message("t.capped", "c1"))
    now = time.time()
    assert _fetch(redis_client, now=now)[0] == ["c0"]
    # Renewed at now + 4: still held at now + 8 (4 s after the renewal)...
    RENEW_SCRIPT(redis_client, ["unacked_index"], [PREFIX, repr(now + 4), "c0"])
    assert _fetch(redis_client, now=now + 8)[0] == []
    # ...and free once the lease has passed without a renewal (a SIGKILLed holder).
    assert _fetch(redis_client, now=now + 9.5)[0] == ["c1"]
    # The ack script releases too.
    ACK_SCRIPT(redis_client, ["unacked", "unacked_index"], [PREFIX, "c1"])
    assert redis_client.zcard(KEYS.flow_slots("t.capped")) == 0


def test_rate_gives_a_burst_then_a_retry_time(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.rated": {"rate": "5/s", "concurrency": None, "partitioned": False}}, 30)
    _push(redis_client, "normal", *(_message("t.rated", f"r{i}") for i in range(5)))
    now = time.time()
    tags, _ = _fetch(redis_client, now=now)
    assert tags == ["r0"]  # burst 1 at 5/s
    tags, reply = _fetch(redis_client, now=now + 0.05)
    assert tags == [] and reply[0] == 0
    assert 100 <= int(reply[1]) <= 200  # the next one is due 0.2 s after the first
    assert _fetch(redis_client, now=now + 0.21)[0] == ["r1"]


def test_fair_share_alternates_partitions(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.tenant": {"rate": None, "concurrency": None, "partitioned": True}}, 30)
    _push(redis_client, "normal", *(_message("t.tenant", f"a{i}", "A") for i in range(50)))
    _push(redis_client, "normal", *(_message("t.tenant", f"b{i}", "B") for i in range(3)))
    tags, _ = _fetch(redis_client, want=8)
    assert tags == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4"]
    store.set_weight("t.tenant", "A", 3)
    _push(redis_client, "normal", *(_message("t.tenant", f"c{i}", "C") for i in range(5)))
    tags, _ = _fetch(redis_client, want=8)
    # C joins at the current turn; A takes three per turn.
    assert tags.count("c0") == 1 and sum(t.startswith("a") for t in tags) >= 4


def test_paused_queue_is_not_touched_and_critical_still_runs(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.pause(queue="normal", key="deploy")
    store.pause(queue="normal", key="maintenance")
    _push(redis_client, "normal", *(_message("t.plain", f"p{i}") for i in range(4)))
    _push(redis_client, "critical", _message("t.urgent", "u0"))
    assert _fetch(redis_client)[0] == ["u0"]
    assert redis_client.llen("normal") == 4
    assert store.resume(queue="normal", key="deploy") == ["maintenance"]
    assert _fetch(redis_client)[0] == []
    assert store.resume(queue="normal", key="maintenance") == []
    assert _fetch(redis_client)[0] == ["p0", "p1", "p2", "p3"]


def test_task_glob_pause_holds_in_order(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.pause(task="billing.*", key="ops")
    _push(
        redis_client,
        "normal",
        _message("billing.charge", "b0"),
        _message("t.plain", "p0"),
        _message("billing.refund", "b1"),
    )
    assert _fetch(redis_client)[0] == ["p0"]
    assert {h["reason"] for h in store.held()} == {"task_paused"}
    store.resume(task="billing.*", key="ops")
    assert _fetch(redis_client)[0] == ["b0", "b1"]
    assert store.held() == []


def test_limits_set_clear_and_reset(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.x": {"rate": "20/s", "concurrency": 2, "partitioned": False}})
    assert store.set_limits("t.x", rate="2/s").rule() == "2|1.0|2|0|1"
    assert store.set_limits("t.x", concurrency=0).concurrency is None
    cleared = store.clear_limits("t.x")
    assert (cleared.rate, cleared.concurrency) == (None, None)
    assert redis_client.hget(KEYS.flow_rules(), "t:t.x") is None
    reset = store.reset_limits("t.x")
    assert (str(reset.rate), reset.concurrency, reset.source) == ("20/s", 2, "declared")
    assert redis_client.hget(KEYS.flow_rules(), "t:t.x") == b"20|1.0|2|0|2"


def test_a_late_tenant_gets_its_turn_behind_a_large_bucket(redis_client: redis.Redis) -> None:
    store = _store(redis_client)
    store.declare({"t.tenant": {"rate": None, "concurrency": None, "partitioned": True}}, 30)
    _push(redis_client, "normal", *(_message("t.tenant", f"a{i}", "A") for i in range(500)))
    assert _fetch(redis_client, want=4)[0] == ["a0", "a1", "a2", "a3"]
    # 496 of A wait in their bucket; B's two arrive in the list behind them.
    _push(redis_client, "normal", _message("t.tenant", "b0", "B"), _message("t.tenant", "b1", "B"))
    tags = _fetch(redis_client, want=4)[0]
    assert "b0" in tags, tags
