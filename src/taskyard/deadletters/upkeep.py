"""Dead-letter upkeep: the transport's quarantine ingested, retention applied, by this part.

Two chores keep the store true without an operator: queue items the Redis transport set aside
(:mod:`taskyard.deadletters.transport`) become poison entries, and entries past the count and
age bounds go. Both run in a daemon thread of every worker's main process (started on
``worker_ready``), every ``TASKYARD_DEAD_LETTERS__UPKEEP_INTERVAL_S``, so they need neither beat
nor the stats job: poison is found in the dead letters within an interval of being set aside.
With many workers one does the chores per interval: each pass takes a Redis lock (``SET NX PX``
of the interval) first, and a worker that does not get it skips the pass. Both chores are safe
to run twice anyway (ingest trims only what it recorded; trimming is idempotent).
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Celery

from taskyard.deadletters.store import RedisDeadLetterStore
from taskyard.deadletters.transport import ingest
from taskyard.outage import Periodic, in_workers
from taskyard.runtime import Runtime

log = logging.getLogger(__name__)


def upkeep(runtime: Runtime, *, interval_s: float) -> dict[str, int] | None:
    """One pass of both chores, unless another process did them this interval (then None)."""
    token = f"{os.getpid()}:{threading.get_ident()}"
    if not runtime.redis.set(
        runtime.keys.dead_upkeep_lock(), token, nx=True, px=max(1, int(interval_s * 1000))
    ):
        return None
    quarantined = ingest(runtime)
    dropped = RedisDeadLetterStore.for_runtime(runtime).trim()
    return {"quarantined": quarantined, "dropped": dropped}


def _upkeep_pass(runtime: Runtime, interval_s: float) -> None:
    done = upkeep(runtime, interval_s=interval_s)
    if done and done["quarantined"]:
        log.warning(
            "dead letters: %d queue item(s) the transport set aside recorded as poison",
            done["quarantined"],
        )


def install_upkeep(app: Celery, runtime: Runtime) -> None:
    """Run :func:`upkeep` every ``upkeep_interval_s`` in ``app``'s workers (connects signals
    only; no I/O here)."""
    interval_s = runtime.settings.dead_letters.upkeep_interval_s
    in_workers(
        app,
        lambda: Periodic(
            "taskyard-dead-letter-upkeep",
            interval_s,
            lambda: _upkeep_pass(runtime, interval_s),
            log,
            "dead-letter upkeep",
        ),
    )
