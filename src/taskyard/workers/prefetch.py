"""Prefetch by what a worker consumes and how it hands reserved work to its processes.

The app reserves one message per process (``worker_prefetch_multiplier=1``), so urgent work
never waits behind reserved lower work. This bootstep raises that where it costs no urgency:

* a worker that consumes neither the critical nor the high queue (the ``default`` and
  ``batch`` profiles, or ``-Q normal``) has no urgent work to protect, and a single reserved
  message leaves its pool idle while the next one is fetched: it reserves
  ``bulk_prefetch_multiplier`` per process, as plain Celery does;
* a worker that does consume them and starts reserved tasks most urgent first (a prefork
  worker: :mod:`taskyard.workers.urgent`) reserves ``urgent_prefetch_multiplier`` per
  process: each process has its next task at hand instead of waiting for a fetch, and an
  urgent message starts on the next free process ahead of every reserved lower task.

A worker started with its own ``--prefetch-multiplier`` keeps it. Decided from the worker's own
queues and pool, so ``celery -A APP worker -Q low`` behaves the
same as a profile.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from taskyard.routing.levels import Priority
from taskyard.runtime import runtime_of
from taskyard.workers.urgent import orders_by_urgency

log = logging.getLogger("taskyard.workers")

#: Queues whose presence keeps a worker at one reserved message per process.
URGENT_QUEUES = frozenset({Priority.CRITICAL.value, Priority.HIGH.value})


def bulk_only(queue_names: set[str]) -> bool:
    """True when a worker consuming ``queue_names`` has no urgent queue among them."""
    return bool(queue_names) and not (queue_names & URGENT_QUEUES)


class BulkPrefetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: raise the prefetch where reserving more costs no urgency."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        queues = set(c.app.amqp.queues.consume_from or c.app.amqp.queues)
        if c.qos is None or not queues:
            return
        if c.prefetch_multiplier != 1:
            # Not the app's one per process: the worker's own --prefetch-multiplier, kept.
            return
        settings = runtime_of(c.app).settings
        if bulk_only(queues):
            multiplier = settings.bulk_prefetch_multiplier
            why = "this worker consumes no urgent queue"
        elif orders_by_urgency(c.controller):
            multiplier = settings.urgent_prefetch_multiplier
            why = "reserved tasks start most urgent first"
        else:
            return
        if multiplier <= 1:
            return
        processes = max(1, getattr(c.pool, "num_processes", 1) or 1)
        count = multiplier * processes
        c.prefetch_multiplier = multiplier
        c.initial_prefetch_count = count
        c.qos.value = count
        c.qos.set(count)
        log.info(
            "prefetch %d (x%d per process): %s (%s)",
            count,
            multiplier,
            why,
            ", ".join(sorted(queues)),
        )
