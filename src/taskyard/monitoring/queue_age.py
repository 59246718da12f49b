"""Age of the oldest ready message of each queue on a Redis broker.

kombu's Redis transport LPUSHes each message onto its queue's priority sub-list and workers pop
from the right (BRPOP), so the oldest ready message of a sub-list is at index -1. Its age comes
from the ``taskyard_sent_at`` header that capture stamps on every message at publish time; a
message without it (capture off, another producer) gives no age rather than a wrong one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import redis
from kombu.transport.redis import PRIORITY_STEPS

from taskyard.monitoring.capture import SENT_HEADER
from taskyard.monitoring.queues import priority_lists


def _sent_at(raw: bytes | None) -> float | None:
    if not raw:
        return None
    try:
        headers = json.loads(raw).get("headers") or {}
        sent = float(headers[SENT_HEADER])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return sent if sent == sent else None  # NaN is no time


def oldest_ready_ages(
    client: redis.Redis,
    queues: Iterable[str],
    now: float | None = None,
    steps: Iterable[int] = PRIORITY_STEPS,
) -> dict[str, float | None]:
    """Seconds the oldest ready message of each queue has waited (None: empty or unknown).

    One pipelined round trip: the tail of every priority sub-list.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    names, steps = list(queues), list(steps)
    with client.pipeline(transaction=False) as pipe:
        for queue in names:
            for key in priority_lists(queue, steps):
                pipe.lindex(key, -1)
        tails = pipe.execute()
    now = time.time() if now is None else now
    ages: dict[str, float | None] = {}
    for i, queue in enumerate(names):
        sent = [
            s for s in map(_sent_at, tails[i * len(steps) : (i + 1) * len(steps)]) if s is not None
        ]
        ages[queue] = max(0.0, now - min(sent)) if sent else None
    return ages
