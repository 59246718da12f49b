"""True queue depth: every priority sub-list plus reserved-but-unacknowledged messages.

kombu's Redis transport keeps one LIST per priority step of a queue: ``name`` for step 0 and
``name + "\\x06\\x16" + str(step)`` for the others (``Channel._q_for_pri``), and parks each
delivered-but-unacknowledged message in the ``unacked`` HASH (delivery tag -> JSON
``[message, exchange, routing_key]``) until it is acknowledged. Counting only ``LLEN name`` (what
Flower and celery-exporter do) misses both. On RabbitMQ the broker counts for us: a passive
``queue_declare`` returns the ready messages; unacknowledged ones need the management plugin,
which may not be enabled, so they are reported as unknown.

Countdown/ETA messages wait in taskyard's delayed sets on a Redis broker
(:mod:`taskyard.broker.delays`) and are counted as ``scheduled``, apart from the depth: they
are not ready yet. On RabbitMQ they sit unacknowledged in a worker (Celery's behaviour), so
``scheduled`` is unknown (None) there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from kombu.connection import Connection
from kombu.transport.redis import PRIORITY_STEPS, Channel

from taskyard.config import REDIS_SCHEMES, redis_client_url, url_scheme
from taskyard.keys import Keys
from taskyard.routing.levels import LEVEL_NAMES
from taskyard.runtime import redis_client
from taskyard.seams import Seam

# kombu's naming of a queue's priority sub-lists and reserved-message hash, read here to count
# queue depths (checked by tests/test_seams.py).
SEAMS = (
    Seam("kombu.transport.redis.Channel", "sep", "attribute", value="\x06\x16"),
    Seam("kombu.transport.redis.Channel", "unacked_key", "attribute", value="unacked"),
    Seam("kombu.transport.redis", "PRIORITY_STEPS", "attribute", value=[0, 3, 6, 9]),
)

#: Separator kombu puts between a queue name and its priority step.
PRIORITY_SEP: str = Channel.sep
#: HASH of reserved (delivered, not yet acknowledged) messages of kombu's Redis transport.
UNACKED_KEY: str = Channel.unacked_key


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Depth of one queue: ready (waiting in the broker) plus reserved (held by a worker)."""

    queue: str
    ready: int
    reserved: int
    reserved_known: bool = True
    #: Messages waiting for their ETA in the delayed set; None where the broker keeps none.
    scheduled: int | None = None

    @property
    def depth(self) -> int:
        return self.ready + self.reserved

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "depth": self.depth,
            "ready": self.ready,
            "reserved": self.reserved,
            "reserved_known": self.reserved_known,
            "scheduled": self.scheduled,
        }


def priority_lists(queue: str, steps: Iterable[int] = PRIORITY_STEPS) -> list[str]:
    """Redis keys of every priority sub-list of ``queue``, as kombu names them."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in steps]


def is_redis_url(url: str) -> bool:
    """Whether redis-py can read the broker's lists at ``url`` (Sentinel URLs it cannot)."""
    return url_scheme(url) in REDIS_SCHEMES


def _reserved_queue(raw: bytes, known: set[str]) -> str | None:
    """Queue a reserved message belongs to: its routing key (queue name on taskyard's direct
    exchange), else the delivery info inside the message."""
    try:
        message, _exchange, routing_key = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if routing_key in known:
        return str(routing_key)
    try:
        key = message["properties"]["delivery_info"]["routing_key"]
    except (KeyError, TypeError):
        return None
    return str(key) if key in known else None


def redis_depths(
    client: redis.Redis,
    queues: Iterable[str] = LEVEL_NAMES,
    steps: Iterable[int] = PRIORITY_STEPS,
    namespace: str = "taskyard",
) -> list[QueueDepth]:
    """Depth of each queue on a Redis broker (one pipelined round trip plus the unacked HASH),
    and its scheduled messages (the delayed set of ``namespace``).

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    names = list(queues)
    steps = list(steps)
    keys = Keys(namespace)
    with client.pipeline(transaction=False) as pipe:
        for queue in names:
            for key in priority_lists(queue, steps):
                pipe.llen(key)
        for queue in names:
            pipe.zcard(keys.delayed(queue))
        pipe.hvals(UNACKED_KEY)
        replies = pipe.execute()
    unacked: list[bytes] = replies.pop()
    scheduled = [int(n) for n in replies[-len(names) :]] if names else []
    reserved = dict.fromkeys(names, 0)
    known = set(names)
    for raw in unacked:
        owner = _reserved_queue(raw, known)
        if owner is not None:
            reserved[owner] += 1
    per_queue = len(steps)
    return [
        QueueDepth(
            queue,
            sum(int(n) for n in replies[i * per_queue : (i + 1) * per_queue]),
            reserved[queue],
            scheduled=scheduled[i],
        )
        for i, queue in enumerate(names)
    ]


def amqp_queue_counts(
    broker_url: str, queues: Iterable[str] = LEVEL_NAMES, timeout_s: float = 4.0
) -> list[tuple[str, int, int]]:
    """(queue, ready messages, consumers) of each queue on an AMQP broker, by passive declare.

    A queue that does not exist yet counts 0 and 0.

    Raises:
        kombu.exceptions.OperationalError, OSError: the broker is unreachable.
    """
    counts: list[tuple[str, int, int]] = []
    with Connection(broker_url, connect_timeout=timeout_s) as conn:
        conn.ensure_connection(max_retries=1)
        channel = conn.channel()
        try:
            for queue in queues:
                try:
                    _name, ready, consumers = channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    # 404 NOT_FOUND closes the channel; the queue simply has no messages yet.
                    channel = conn.channel()
                    ready, consumers = 0, 0
                counts.append((queue, int(ready), int(consumers)))
        finally:
            channel.close()
    return counts


def amqp_depths(
    broker_url: str, queues: Iterable[str] = LEVEL_NAMES, timeout_s: float = 4.0
) -> list[QueueDepth]:
    """Ready messages of each queue on an AMQP broker.

    Unacknowledged messages are not visible over AMQP, so they are reported as unknown
    (``reserved_known=False``).
    """
    return [
        QueueDepth(queue, ready, 0, reserved_known=False)
        for queue, ready, _consumers in amqp_queue_counts(broker_url, queues, timeout_s)
    ]


def broker_redis_client(broker_url: str, timeout_s: float) -> redis.Redis:
    """A Redis client on the broker's database (it may differ from taskyard's stats Redis)."""
    return redis_client(
        redis_client_url(broker_url),
        socket_connect_timeout=timeout_s,
        socket_timeout=max(timeout_s, 5.0),
    )
