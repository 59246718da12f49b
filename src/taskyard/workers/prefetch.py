"""Prefetch by what a worker consumes: one message per process where urgent work can arrive.

A worker that consumes the critical or high queue reserves one message per process (the app's
``worker_prefetch_multiplier=1``), so urgent work never waits behind reserved lower work. A
worker that consumes neither (the ``default`` and ``batch`` profiles, or ``-Q normal``) has no
urgent work to protect, and a single reserved message leaves its pool idle while the next one is
fetched: it prefetches ``bulk_prefetch_multiplier`` per process instead, as plain Celery does.
Decided from the worker's own queues, so ``celery -A APP worker -Q low`` behaves the same as a
profile.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from taskyard.routing.levels import Priority

log = logging.getLogger("taskyard.workers")

#: Queues whose presence keeps a worker at one reserved message per process.
URGENT_QUEUES = frozenset({Priority.CRITICAL.value, Priority.HIGH.value})


def bulk_only(queue_names: set[str]) -> bool:
    """True when a worker consuming ``queue_names`` has no urgent queue among them."""
    return bool(queue_names) and not (queue_names & URGENT_QUEUES)


class BulkPrefetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: raise the prefetch of workers that consume no urgent queue."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        multiplier = int(c.app.conf.get("taskyard_bulk_prefetch_multiplier", 1))
        queues = set(c.app.amqp.queues.consume_from or c.app.amqp.queues)
        if multiplier <= 1 or not bulk_only(queues) or c.qos is None:
            return
        processes = max(1, getattr(c.pool, "num_processes", 1) or 1)
        count = multiplier * processes
        c.prefetch_multiplier = multiplier
        c.initial_prefetch_count = count
        c.qos.value = count
        c.qos.set(count)
        log.info(
            "prefetch %d (x%d per process): this worker consumes no urgent queue (%s)",
            count,
            multiplier,
            ", ".join(sorted(queues)),
        )
