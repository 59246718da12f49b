"""Deferral without loss: a held-back task goes back to its queue, later, with everything it had.

The task is re-published with its id, arguments, options and level (the queue it came from) and a
countdown plus jitter; the delivery being run is then acknowledged (``Ignore``). Two message
headers travel with it: how often it was deferred and since when. A task deferred for longer than
``max_defer_age_s`` runs anyway and is logged as *overdue*: work is never dropped, and the
countdown keeps a held-back task from spinning hot.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import time
from typing import Any

from celery.exceptions import Ignore, Reject

from taskyard.signals import task_deferred

log = logging.getLogger("taskyard.guards")

#: Message header: how many times the task was deferred so far.
HEADER_DEFERRALS = "taskyard_deferrals"
#: Message header: when (s since the epoch) the task was first deferred.
HEADER_SINCE = "taskyard_deferred_since"

#: Counter slots shared by a worker's processes.
DEFERRED, OVERDUE, LIMITED = 0, 1, 2


class Counters:
    """Deferred / overdue / limit-exceeded counts of one worker, summed over its pool processes.

    :meth:`share` (in the worker's main process, before the pool forks) moves the counts into
    shared memory so the heartbeat of the main process sees what the children did.
    """

    def __init__(self) -> None:
        self._local = [0, 0, 0]
        self._shared: Any = None
        self._lock: Any = None

    def share(self) -> None:
        if self._shared is None:
            self._shared = multiprocessing.RawArray("q", 3)
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

    def __init__(self, countdown_s: float, jitter_s: float, max_age_s: float,
                 counters: Counters) -> None:
        self.countdown_s = countdown_s
        self.jitter_s = jitter_s
        self.max_age_s = max_age_s
        self.counters = counters

    def hold(self, task: Any, args: Any, kwargs: Any, level: str, reason: str) -> None:
        """Defer the running delivery of ``task`` (raises ``Ignore``), or return when it is
        overdue and must run now."""
        request = task.request
        count, since = deferral_state(request)
        now = time.time()
        if since is not None and now - since > self.max_age_s:
            self.counters.add(OVERDUE)
            log.warning(
                "task %s[%s] overdue: deferred %d times over %.0f s (max_defer_age_s=%g), "
                "running despite %s", task.name, request.id, count, now - since, self.max_age_s,
                reason,
            )
            return
        count += 1
        countdown = self.countdown_s + random.uniform(0.0, self.jitter_s)
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
            log.warning("task %s[%s] could not be re-published (%s); requeued instead",
                        task.name, request.id, exc)
            raise Reject(f"deferred: {reason}", requeue=True) from exc
        self.counters.add(DEFERRED)
        log.info("task %s[%s] deferred (%d) for %.1f s: %s", task.name, request.id, count,
                 countdown, reason)
        task_deferred.send(sender=task.name, task_id=request.id, level=level, reason=reason,
                           deferrals=count)
        raise Ignore(f"deferred: {reason}")
