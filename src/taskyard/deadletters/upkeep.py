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
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from taskyard.deadletters.store import RedisDeadLetterStore
from taskyard.deadletters.transport import ingest
from taskyard.outage import Outage
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


class Upkeep(threading.Thread):
    """Runs :func:`upkeep` every ``interval_s`` until stopped (a daemon thread)."""

    def __init__(self, runtime: Runtime, interval_s: float) -> None:
        super().__init__(daemon=True, name="taskyard-dead-letter-upkeep")
        self.runtime = runtime
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._outage = Outage(log, "dead-letter upkeep")

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                done = upkeep(self.runtime, interval_s=self.interval_s)
                if done and done["quarantined"]:
                    log.warning(
                        "dead letters: %d queue item(s) the transport set aside recorded as poison",
                        done["quarantined"],
                    )
            except Exception as exc:  # the next pass retries
                self._outage.failed(exc)
            else:
                self._outage.ok()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout_s)


def install_upkeep(app: Celery, runtime: Runtime) -> None:
    """Start :class:`Upkeep` in ``app``'s workers (connects signals only; no I/O here)."""
    threads: list[Upkeep] = []

    def start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app or threads:
            return
        thread = Upkeep(runtime, runtime.settings.dead_letters.upkeep_interval_s)
        thread.start()
        threads.append(thread)

    def stop(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        while threads:
            threads.pop().stop()

    worker_ready.connect(start, weak=False)
    worker_shutdown.connect(stop, weak=False)
