"""Deferral without loss: a held-back task goes back to its queue, later, with everything it had.

Only memory defers (the level's memory threshold, or ``requires_memory_mb``); CPU pressure holds
lower levels back at the source instead (:mod:`.backpressure`). The task is re-published with its
id, arguments, options and level (the queue it came from) and a countdown that doubles with each
deferral, with jitter, up to ``defer_max_countdown_s`` (a countdown is what broker-side delays
hold in Redis where the transport has them); the delivery being run is then acknowledged
(``Ignore``). Two message headers travel with it: how often it was deferred and since when. A task
deferred for longer than ``max_defer_age_s`` runs anyway and is logged as *overdue*: work is never
dropped, and the backoff keeps a held-back task from spinning hot.

Monitoring: Celery sends ``task-started`` for the delivery before ``before_start`` runs and
nothing at all for ``Ignore``, so Flower would list the deferred delivery as running for good.
A ``task-deferred`` event (a custom task event; Flower's state shows it as state ``DEFERRED``)
closes it.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore, Reject

from taskyard.signals import task_deferred
from taskyard.workers.guards.policy import REASON_MEMORY, REASONS

log = logging.getLogger("taskyard.guards")

#: Message header: how many times the task was deferred so far.
HEADER_DEFERRALS = "taskyard_deferrals"
#: Message header: when (s since the epoch) the task was first deferred.
HEADER_SINCE = "taskyard_deferred_since"

#: Monitoring event sent for a deferred delivery (Flower shows its state as ``DEFERRED``).
DEFERRED_EVENT = "task-deferred"

#: Counter slots shared by a worker's processes; then one per deferral reason (REASONS order).
DEFERRED, OVERDUE, LIMITED = 0, 1, 2
REASON_SLOTS = {reason: 3 + i for i, reason in enumerate(REASONS)}
SLOTS = 3 + len(REASONS)


class Counters:
    """Deferred / overdue / limit-exceeded counts of one worker, summed over its pool processes.

    :meth:`share` (in the worker's main process, before the pool forks) moves the counts into
    shared memory so the heartbeat of the main process sees what the children did.
    """

    def __init__(self) -> None:
        self._local = [0] * SLOTS
        self._shared: Any = None
        self._lock: Any = None

    def share(self) -> None:
        if self._shared is None:
            self._shared = multiprocessing.RawArray("q", SLOTS)
            for slot, value in enumerate(self._local):
                self._shared[slot] = value
            self._lock = multiprocessing.Lock()

    def add(self, slot: int, n: int = 1) -> None:
        if self._shared is None:
            self._local[slot] += n
            return
        with self._lock:
            self._shared[slot] += n

    def get(self, slot: int) -> int:
        if self._shared is None:
            return self._local[slot]
        return int(self._shared[slot])

    def by_reason(self) -> dict[str, int]:
        """Deferrals per reason (``policy.REASONS``)."""
        return {reason: self.get(slot) for reason, slot in REASON_SLOTS.items()}


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        headers = getattr(request, "headers", None) or {}
        value = headers.get(name)
    return value


def deferral_state(request: Any) -> tuple[int, float | None]:
    """(deferrals so far, first deferral time) from the message headers of ``request``."""
    count = _header(request, HEADER_DEFERRALS)
    since = _header(request, HEADER_SINCE)
    return (int(count) if count else 0), (float(since) if since else None)


class Deferrer:
    """Re-publishes held-back tasks and decides when one is overdue."""

    def __init__(
        self,
        countdown_s: float,
        jitter_s: float,
        max_age_s: float,
        counters: Counters,
        max_countdown_s: float | None = None,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.countdown_s = countdown_s
        self.jitter_s = jitter_s
        self.max_age_s = max_age_s
        self.max_countdown_s = (
            max_countdown_s if max_countdown_s is not None else (countdown_s + jitter_s)
        )
        self.counters = counters
        self.rand = rand

    def countdown(self, deferrals: int) -> float:
        """Delay (s) before the ``deferrals``-th run: doubling per deferral, jittered, capped.

        The jitter spreads tasks deferred in the same instant (a memory spike defers a burst)
        so they do not all come back in the same instant and be deferred together again.
        """
        factor = 2.0 ** min(max(deferrals - 1, 0), 30)
        base = self.countdown_s + self.rand(0.0, self.jitter_s)
        return min(self.max_countdown_s, base * factor)

    def hold(
        self, task: Any, args: Any, kwargs: Any, level: str, reason: str, kind: str = REASON_MEMORY
    ) -> None:
        """Defer the running delivery of ``task`` (raises ``Ignore``), or return when it is
        overdue and must run now."""
        request = task.request
        count, since = deferral_state(request)
        now = time.time()
        if since is not None and now - since > self.max_age_s:
            self.counters.add(OVERDUE)
            log.warning(
                "task %s[%s] overdue: deferred %d times over %.0f s (max_defer_age_s=%g), "
                "running despite %s",
                task.name,
                request.id,
                count,
                now - since,
                self.max_age_s,
                reason,
            )
            return
        count += 1
        countdown = self.countdown(count)
        headers = {HEADER_DEFERRALS: count, HEADER_SINCE: since if since is not None else now}
        signature = task.signature_from_request(request, args, kwargs, countdown=countdown)
        options = signature.options
        options["headers"] = {**(options.get("headers") or {}), **headers}
        # The level is the queue the delivery came from (a per-call override included).
        options["queue"] = level
        options["routing_key"] = level
        options.pop("exchange", None)
        options.pop("redelivered", None)
        try:
            signature.apply_async()
        except Exception as exc:
            # Not re-published: hand the delivery back to the broker unacknowledged instead, so
            # it is redelivered (at once when the broker is back) and never lost.
            log.warning(
                "task %s[%s] could not be re-published (%s); requeued instead",
                task.name,
                request.id,
                exc,
            )
            raise Reject(f"deferred: {reason}", requeue=True) from exc
        self.counters.add(DEFERRED)
        self.counters.add(REASON_SLOTS.get(kind, REASON_SLOTS[REASON_MEMORY]))
        log.info(
            "task %s[%s] deferred (%d) for %.1f s: %s",
            task.name,
            request.id,
            count,
            countdown,
            reason,
        )
        task_deferred.send(
            sender=task.name,
            task_id=request.id,
            level=level,
            reason=reason,
            deferrals=count,
            kind=kind,
        )
        send_deferred_event(
            task,
            level=level,
            reason=reason,
            kind=kind,
            deferrals=count,
            countdown=round(countdown, 3),
        )
        raise Ignore(f"deferred: {reason}")


def send_deferred_event(task: Any, **fields: Any) -> None:
    """Send ``task-deferred`` for the running delivery when the worker sends task events.

    Best-effort, as Celery's own events: a failure is logged and the deferral stands.
    """
    request = task.request
    if not (task.app.conf.worker_send_task_events and getattr(task, "send_events", True)):
        return
    try:
        # Task.send_event publishes through the app's event dispatcher with the delivery's
        # uuid and hostname, as Celery's task events do (one publish; deferrals are rare).
        task.send_event(DEFERRED_EVENT, retry=False, **fields)
    except Exception as exc:
        log.warning(
            "task %s[%s]: could not send %s (%s)", task.name, request.id, DEFERRED_EVENT, exc
        )
