"""The fetch script's extension point on a real Redis: a fragment's admit() and release().

A test-only script is composed exactly as the transport's (``broker.lua.compose``) with one
extra fragment (``fragments/verdicts.lua``) that logs every call and returns each verdict.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from taskyard.broker import lua as broker_lua
from taskyard.lua import Fragment

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
    return [entry.decode() for entry in client.lrange(f"{PREFIX}test:{what}", 0, -1)]


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
