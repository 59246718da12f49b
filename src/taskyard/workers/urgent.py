"""Reserved tasks start most urgent first: the prefork worker's waiting line ordered by level.

A prefork worker hands a reserved task to its pool only while a process is free; the rest
wait in the worker's main process, in the line of its pool semaphore (kombu's
``LaxBoundedSemaphore``), first come first served. A worker that reserves one message per
process has no such line, so an urgent message goes to the next free process; but every
process then idles while the main process fetches its next message, one broker round trip per
task. This step orders that line by priority level instead (critical first, first come first
served within a level), which lets a worker reserve two messages per process
(:mod:`taskyard.workers.prefetch`): each process has its next task at hand, and an urgent
message, fetched as soon as a reservation frees, starts on the next free process ahead of
every reserved lower task.

Celery and kombu internals relied on (celery 5.7, kombu 5.7; declared in ``SEAMS``, checked by
``tests/test_seams.py``; the order tested in ``tests/workers/test_urgent.py``): the worker's
``Pool`` step creates ``worker.semaphore`` when it runs an event loop, and prefork workers
(``pool_cls.uses_semaphore``) pass each request through ``semaphore.acquire(process_task,
request)``; the semaphore keeps waiting calls in ``_waiting``, added by ``_add_waiter`` and taken
by ``_pop_waiter`` (bound to that deque when the semaphore is made); a request's
``delivery_info["routing_key"]`` names its level's queue.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from celery import bootsteps

from taskyard.routing.levels import LEVEL_NAMES
from taskyard.seams import Seam

# Celery and kombu internals the ordering relies on (checked by tests/test_seams.py; the order
# itself by tests/workers/test_urgent.py).
SEAMS = (
    Seam("kombu.asynchronous.semaphore.LaxBoundedSemaphore", "acquire", params=("callback",)),
    Seam("kombu.asynchronous.semaphore.LaxBoundedSemaphore", "_waiting", "instance"),
    Seam("kombu.asynchronous.semaphore.LaxBoundedSemaphore", "_add_waiter", "instance"),
    Seam("kombu.asynchronous.semaphore.LaxBoundedSemaphore", "_pop_waiter", "instance"),
    Seam("celery.worker.worker.WorkController", "_process_task_sem"),
    Seam("celery.worker.components.Pool", "create"),
)

#: Rank of each level's queue (its routing key); other queues rank after every level.
RANKS = {name: index for index, name in enumerate(LEVEL_NAMES)}
UNRANKED = len(LEVEL_NAMES)


def rank_of(waiter: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> int:
    """Rank of a semaphore waiter ``(callback, (request,), kwargs)``; unknown ranks last."""
    _, args, _ = waiter
    try:
        routing_key = args[0].delivery_info.get("routing_key")
    except (AttributeError, IndexError):
        return UNRANKED
    return RANKS.get(routing_key, UNRANKED)


class UrgentFirst(deque[Any]):
    """Waiting calls, most urgent level first and first come first served within a level.

    ``append`` inserts a waiter behind every waiter of its level or a more urgent one; the rest
    of the deque's behaviour is unchanged. The line holds at most a worker's prefetch beyond
    its processes, so the scan is short.
    """

    def append(self, waiter: Any) -> None:
        rank = rank_of(waiter)
        if not self or rank_of(self[-1]) <= rank:
            super().append(waiter)
            return
        for index, queued in enumerate(self):
            if rank_of(queued) > rank:
                self.insert(index, waiter)
                return


def order_by_urgency(semaphore: Any) -> bool:
    """Make ``semaphore``'s waiting line :class:`UrgentFirst`; False if it has none."""
    waiting = getattr(semaphore, "_waiting", None)
    if not isinstance(waiting, deque):
        return False
    if not isinstance(waiting, UrgentFirst):
        line = UrgentFirst()
        for waiter in waiting:
            line.append(waiter)
        semaphore._waiting = line
        semaphore._add_waiter = line.append
        semaphore._pop_waiter = line.popleft
    return True


def orders_by_urgency(worker: Any) -> bool:
    """True when ``worker`` starts its reserved tasks most urgent first."""
    semaphore = getattr(worker, "semaphore", None)
    if not isinstance(getattr(semaphore, "_waiting", None), UrgentFirst):
        return False
    # Requests go through the semaphore only where the pool uses it (prefork).
    through_semaphore = getattr(worker, "_process_task_sem", None)
    return through_semaphore is not None and worker.process_task == through_semaphore


class UrgentFirstStep(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: the pool semaphore's waiting line ordered by priority level."""

    requires = ("celery.worker.components:Pool",)

    def create(self, worker: Any) -> None:
        order_by_urgency(getattr(worker, "semaphore", None))
