"""Warm shutdown of a prefork worker: a task already handed to a pool process is not run twice.

When a worker stops (SIGTERM, warm shutdown), Celery closes the pool and then stops the
consumer, whose ``on_close`` calls the pool's ``flush``. Celery's ``AsynPool.flush`` drops from
the pool's job cache every job a process has not yet acknowledged receiving, on the grounds that
the broker delivers their messages again; but a job whose payload is already written to a
process's pipe is read and run by that process all the same. Its result then finds no job in
the cache: the request's success callback never runs, the message is never acknowledged, and
closing the channel restores it to its queue, so the task runs a second time. When that job is
the last one running, the pool's shutdown loop (which waits while the cache is not empty) also
stops reading results before its result arrives, and the process waits 30 s for the parent to
read it before exiting.

:class:`StopFlush` (a worker bootstep) replaces the pool's ``flush`` once the pool is closed:
jobs never written to a process are still dropped (their messages are restored when the channel
closes and run elsewhere), jobs already written to a live process stay in the cache, and a
payload whose write had begun is written to the end, so the process runs the job once, the pool
reads its result, and the message is acknowledged before the channel closes. While the pool
runs (a consumer restarting after a lost connection) Celery's own ``flush`` applies.

Celery/billiard internals relied on (declared in ``SEAMS``, checked by ``tests/test_seams.py``):
``TaskPool.flush`` (the attribute ``Consumer.on_close`` calls), ``AsynPool._state``,
``_cache``, ``outbound_buffer``, ``_active_writers`` and ``_flush_writer``, and on each job
``_accepted``, ``_write_to`` (the process a write began to; set by ``_write_job`` before its
first byte), ``_writer`` (a weak reference to the write) and ``discard``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from billiard.pool import RUN, TERMINATE
from celery import bootsteps

from taskyard.seams import Seam

# Celery/billiard internals the flush relies on (their existence checked by tests/test_seams.py;
# how Celery calls them by tests/workers/test_shutdown.py).
SEAMS = (
    Seam("celery.worker.consumer.consumer.Consumer", "on_close"),
    Seam("celery.concurrency.prefork.TaskPool", "on_start"),
    Seam("celery.concurrency.prefork.TaskPool", "Pool", "attribute"),
    Seam("celery.concurrency.prefork.TaskPool", "_pool", "instance"),
    Seam("celery.concurrency.asynpool.AsynPool", "_flush_writer", params=("proc", "writer")),
    Seam("celery.concurrency.asynpool.AsynPool", "_active_writers", "instance"),
    Seam("celery.concurrency.asynpool.AsynPool", "outbound_buffer", "instance"),
    Seam("celery.concurrency.asynpool.AsynPool", "_cache", "instance"),
    Seam("celery.concurrency.asynpool.AsynPool", "_state", "instance"),
    Seam("celery.concurrency.asynpool", "_writer", "instance"),
    Seam("celery.concurrency.asynpool", "_write_to", "instance"),
    Seam("billiard.pool.ApplyResult", "_accepted", "instance"),
    Seam("billiard.pool.ApplyResult", "_write_to", "attribute"),
    Seam("billiard.pool.ApplyResult", "discard"),
    Seam("billiard.pool", "RUN", "attribute"),
    Seam("billiard.pool", "TERMINATE", "attribute"),
    Seam("billiard.process.BaseProcess", "_is_alive"),
)

log = logging.getLogger("taskyard.workers")


def _writer_of(job: Any) -> Any:
    ref = getattr(job, "_writer", None)
    return ref() if ref is not None else None


def flush_at_stop(pool: Any) -> None:
    """Drop the jobs no process has received; finish the writes already begun."""
    writers = {}
    for job in tuple(pool._cache.values()):
        writer = _writer_of(job)
        if writer is not None:
            writers[writer] = job
        if not job._accepted and job._write_to is None:
            # Never written: the process will not run it; the channel's close restores it.
            job.discard()
    pool.outbound_buffer.clear()
    for writer in list(pool._active_writers):
        job = writers.get(writer)
        process = job._write_to if job is not None else None
        if process is not None and process._is_alive():
            # Part of the payload may be in the pipe already: the rest must follow, or the
            # sentinel the pool writes at join would land inside it.
            pool._flush_writer(process, writer)
        else:
            pool._active_writers.discard(writer)


def stop_aware_flush(pool: Any, celery_flush: Callable[[], Any]) -> Callable[[], Any]:
    """The pool's ``flush``: Celery's while the pool runs, :func:`flush_at_stop` once closed."""

    def flush() -> Any:
        if pool._state == RUN:
            return celery_flush()
        if pool._state == TERMINATE:
            return None
        flush_at_stop(pool)
        return None

    return flush


class StopFlush(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: install :func:`stop_aware_flush` on a prefork pool."""

    requires = ("celery.worker.components:Pool",)

    def start(self, w: Any) -> None:
        task_pool: Any = getattr(w, "pool", None)
        pool = getattr(task_pool, "_pool", None)
        celery_flush = getattr(task_pool, "flush", None)
        # Only Celery's AsynPool has the write bookkeeping (the prefork pool with an event
        # loop); the solo, thread and blocking pools keep no unacknowledged jobs to drop.
        if pool is None or celery_flush is None or not hasattr(pool, "_active_writers"):
            return
        task_pool.flush = stop_aware_flush(pool, celery_flush)
        log.debug("warm stop keeps the jobs already written to pool processes")
