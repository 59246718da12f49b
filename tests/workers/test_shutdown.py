"""The warm-stop flush of the prefork pool (``taskyard.workers.shutdown``) and its seams.

The end-to-end check (SIGTERM under load, nothing run twice) is
``tests/broker/test_workers.py::test_clean_stops_under_load_rerun_nothing``.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterator
from typing import Any
from weakref import ref

import pytest
from billiard.pool import CLOSE, RUN, TERMINATE, ApplyResult
from celery.concurrency import asynpool, prefork
from celery.worker.consumer import consumer

from taskyard.workers.shutdown import StopFlush, flush_at_stop, stop_aware_flush


class Process:
    """Stands for a pool process: only whether it is alive."""

    def __init__(self, alive: bool = True) -> None:
        self.alive = alive

    def _is_alive(self) -> bool:
        return self.alive


class Pool:
    """The part of ``AsynPool`` the flush touches, with billiard's own job objects."""

    def __init__(self, state: int = CLOSE) -> None:
        self._state = state
        self._cache: dict[int, ApplyResult] = {}
        self.outbound_buffer: deque[ApplyResult] = deque()
        self._active_writers: set[Any] = set()
        self.flushed_writes: list[tuple[Process, Any]] = []

    def job(self, accepted: bool = False, write_to: Process | None = None) -> ApplyResult:
        job = ApplyResult(self._cache, callback=None)
        job._accepted = accepted
        job._write_to = write_to
        return job

    def writing(self, job: ApplyResult) -> Iterator[None]:
        def write() -> Iterator[None]:
            yield

        writer = write()
        job._writer = ref(writer)
        self._active_writers.add(writer)
        return writer

    def _flush_writer(self, process: Process, writer: Any) -> None:
        self.flushed_writes.append((process, writer))
        self._active_writers.discard(writer)


def test_jobs_written_to_a_process_stay_and_unwritten_ones_go() -> None:
    pool = Pool()
    running = pool.job(accepted=True, write_to=Process())
    written = pool.job(write_to=Process())  # in the process's pipe, not yet read
    queued = pool.job()  # never written to any process
    pool.outbound_buffer.append(queued)
    flush_at_stop(pool)
    assert set(pool._cache) == {running._job, written._job}
    assert not pool.outbound_buffer


def test_a_write_begun_is_finished_and_one_to_a_dead_process_dropped() -> None:
    pool = Pool()
    alive, dead = Process(), Process(alive=False)
    begun = pool.job(write_to=alive)
    writer = pool.writing(begun)
    orphan = pool.job(write_to=dead)
    orphan_writer = pool.writing(orphan)
    flush_at_stop(pool)
    assert pool.flushed_writes == [(alive, writer)]
    assert begun._job in pool._cache
    assert orphan_writer not in pool._active_writers
    assert not pool._active_writers


@pytest.mark.parametrize("state", [RUN, CLOSE, TERMINATE])
def test_celery_flush_while_the_pool_runs_ours_once_closed(state: int) -> None:
    pool = Pool(state)
    written = pool.job(write_to=Process())
    calls: list[str] = []

    def celery_flush() -> None:
        calls.append("celery")
        written.discard()

    stop_aware_flush(pool, celery_flush)()
    assert calls == (["celery"] if state == RUN else [])
    # A consumer restart after a lost connection keeps Celery's behaviour; a stop keeps the job.
    assert (written._job in pool._cache) == (state != RUN)


def test_create_app_adds_the_worker_step(make_app: Any) -> None:
    app = make_app("shutdown")
    assert StopFlush in app.steps["worker"]


def test_celery_seams_are_where_the_flush_expects_them() -> None:
    # Consumer.on_close (run when the consumer stops or restarts) calls the pool's flush,
    # which the prefork TaskPool proxies from the AsynPool as an instance attribute.
    assert "self.pool.flush()" in inspect.getsource(consumer.Consumer.on_close)
    assert "self.flush = getattr(P, 'flush', None)" in inspect.getsource(prefork.TaskPool.on_start)
    assert prefork.TaskPool.Pool is asynpool.AsynPool
    # The AsynPool bookkeeping read and changed by flush_at_stop.
    init = inspect.getsource(asynpool.AsynPool.__init__)
    assert "self._active_writers = set()" in init
    assert "self.outbound_buffer = deque()" in init
    assert "_cache" in inspect.getsource(asynpool.AsynPool.flush)
    # A write records its process before its first byte, and the job keeps a weak reference to
    # the write; a job is dropped with discard() and accepted when its process reads it.
    write = inspect.getsource(asynpool.AsynPool._create_write_handlers)
    assert write.index("job._write_to = proc") < write.index("Hw += send(header, Hw)")
    assert "job._writer = ref(cor)" in write
    job = ApplyResult({}, callback=None)
    assert job._accepted is False and job._write_to is None
    job.discard()
