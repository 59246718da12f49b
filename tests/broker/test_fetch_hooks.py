"""The fetch script's extension point on a real Redis: a fragment's admit() and release().

A test-only script is composed exactly as the transport's (``broker.lua.compose``) with one
extra fragment (``fragments/verdicts.lua``) that logs every call and returns each verdict.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue

from taskyard.broker import lua as broker_lua
from taskyard.broker import transport
from taskyard.lua import Fragment
from taskyard.serialization import text
from taskyard.testing import wait_until
from tests import servers

FRAGMENT = Fragment(
    "verdicts.lua", (Path(__file__).parent / "fragments" / "verdicts.lua").read_text()
)
FETCH = broker_lua.compose("fetch.lua", FRAGMENT)
ACK = broker_lua.compose("ack.lua", FRAGMENT)
PREFIX = "t:"
UNACKED, INDEX, QUARANTINE = "unacked", "unacked_index", "quarantine"
LISTS = ("high", "normal")
KEYS = (UNACKED, INDEX, QUARANTINE, *LISTS, *(f"wake:{q}" for q in LISTS))


def message(name: str, queue: str = "high") -> str:
    return json.dumps(
        {
            "body": "",
            "headers": {"task": name},
            "properties": {
                "delivery_tag": f"tag-{name}",
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
    )


def fill(client: redis.Redis, queue: str, names: list[str]) -> None:
    """Queue ``names`` so that they pop in the order given (kombu pops from the right)."""
    client.lpush(queue, *(message(name, queue) for name in names))


def fetch(
    client: redis.Redis, script: Any = FETCH, want: int = 10, acks: tuple[str, ...] = ()
) -> Any:
    args = [PREFIX, repr(time.time()), len(LISTS), want, "1", len(acks), *acks]
    return script(client, KEYS, args)


def delivered(reply: list[Any]) -> list[tuple[int, str]]:
    assert reply[0] == 1, reply
    return [
        (int(reply[i]), json.loads(reply[i + 1])["headers"]["task"])
        for i in range(1, len(reply), 2)
    ]


def names_in(client: redis.Redis, queue: str) -> list[str]:
    """The queue's messages in pop order."""
    return [json.loads(raw)["headers"]["task"] for raw in reversed(client.lrange(queue, 0, -1))]


def log(client: redis.Redis, what: str) -> list[str]:
    return log_at(client, PREFIX, what)


def test_every_popped_message_passes_admit_and_each_verdict_is_obeyed(
    redis_client: redis.Redis,
) -> None:
    fill(redis_client, "high", ["hold.x", "run.b", "drop.c", "odd.d", "hold.y"])
    fill(redis_client, "normal", ["run.a"])
    reply = fetch(redis_client)
    assert delivered(reply) == [(1, "run.b"), (2, "run.a")]
    # Called once per message, in pop order, with its list's position and a numeric time.
    assert log(redis_client, "admitted") == [
        "hold.x|1|number",
        "run.b|1|number",
        "drop.c|1|number",
        "odd.d|1|number",
        "hold.y|1|number",
        "run.a|2|number",
    ]
    # Held (and the unknown verdict) back in their places; dropped gone; only runs recorded.
    assert names_in(redis_client, "high") == ["hold.x", "odd.d", "hold.y"]
    assert sorted(redis_client.hkeys(UNACKED)) == [b"tag-run.a", b"tag-run.b"]
    assert sorted(redis_client.zrange(INDEX, 0, -1)) == [b"tag-run.a", b"tag-run.b"]
    # Nothing runnable left: the wake stream ids come back, and the held stay in order.
    assert fetch(redis_client)[0] == 0
    assert names_in(redis_client, "high") == ["hold.x", "odd.d", "hold.y"]


def test_release_runs_for_each_acknowledged_tag_before_its_records_go(
    redis_client: redis.Redis,
) -> None:
    fill(redis_client, "high", ["run.a", "run.b"])
    delivered(fetch(redis_client))
    # Carried on a fetch, then through the ack script: release() sees each record still there.
    fetch(redis_client, acks=("tag-run.a",))
    ACK(redis_client, (UNACKED, INDEX), (PREFIX, "tag-run.b", "tag-unknown"))
    assert log(redis_client, "released") == ["tag-run.a|1", "tag-run.b|1", "tag-unknown|0"]
    assert redis_client.hlen(UNACKED) == 0 and redis_client.zcard(INDEX) == 0


def test_a_long_held_backlog_does_not_block_the_next_list(redis_client: redis.Redis) -> None:
    held = [f"hold.{i}" for i in range(250)]
    fill(redis_client, "high", held)
    fill(redis_client, "normal", ["run.a"])
    assert delivered(fetch(redis_client)) == [(2, "run.a")]
    assert len(log(redis_client, "admitted")) < 250  # the scan stopped at the bound
    assert names_in(redis_client, "high") == held


def test_the_installed_scripts_admit_everything_and_release_nothing(
    redis_client: redis.Redis,
) -> None:
    fill(redis_client, "high", ["hold.x", "drop.y"])
    reply = fetch(redis_client, broker_lua.FETCH_SCRIPT)
    assert delivered(reply) == [(1, "hold.x"), (1, "drop.y")]
    broker_lua.ACK_SCRIPT(redis_client, (UNACKED, INDEX), (PREFIX, "tag-hold.x", "tag-drop.y"))
    assert redis_client.hlen(UNACKED) == 0
    assert redis_client.keys(f"{PREFIX}*") == []
    assert "verdicts.lua" not in broker_lua.FETCH_SCRIPT.source


def test_the_transport_runs_the_hooks_under_its_key_prefix(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through kombu: the channel passes its prefix, and an ack reaches release()."""
    monkeypatch.setattr(transport, "FETCH_SCRIPT", FETCH)
    monkeypatch.setattr(transport, "ACK_SCRIPT", ACK)
    options = {"global_keyprefix": "pfx:", "taskyard_namespace": "ns"}
    conn = Connection(servers.REDIS_URL, transport=transport.Transport, transport_options=options)
    exchange = Exchange("hooked", "direct")
    queue = Queue("hooked", exchange, routing_key="hooked")
    got: list[Any] = []
    try:
        channel = conn.channel()
        queue(channel).declare()
        producer = Producer(channel, exchange)
        for name in ("hold.b", "run.a"):
            producer.publish({"n": name}, routing_key="hooked", headers={"task": name})
        consumer = Consumer(conn.channel(), [queue], callbacks=[lambda _, m: got.append(m)])
        consumer.qos(prefetch_count=4)
        with consumer:
            wait_until(lambda: _drained(conn) and bool(got), 10, message="run.a delivered")
            got[0].ack()
    finally:
        conn.release()
    assert [message.headers["task"] for message in got] == ["run.a"]
    admitted = log_at(redis_client, "pfx:ns:", "admitted")
    assert "hold.b|1|number" in admitted and "run.a|1|number" in admitted
    assert log_at(redis_client, "pfx:ns:", "released") == [f"{got[0].delivery_tag}|1"]
    assert [
        json.loads(raw)["headers"]["task"] for raw in redis_client.lrange("pfx:hooked", 0, -1)
    ] == ["hold.b"]


def _drained(conn: Connection) -> bool:
    with contextlib.suppress(TimeoutError):
        conn.drain_events(timeout=0.2)
    return True


def log_at(client: redis.Redis, prefix: str, what: str) -> list[str]:
    return [text(entry) for entry in client.lrange(f"{prefix}test:{what}", 0, -1)]
