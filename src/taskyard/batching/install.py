"""Hooking batching into an app: the reaper task and the worker flusher thread."""

from __future__ import annotations

import logging
from typing import Any

from taskyard.batching.reaper import REAP_TASK, flusher, reap
from taskyard.config import Settings
from taskyard.outage import Periodic, in_workers
from taskyard.routing.levels import Priority
from taskyard.runtime import PeriodicJob, Runtime, TaskyardApp

log = logging.getLogger(__name__)


def periodic_jobs(settings: Settings) -> dict[str, PeriodicJob]:
    """The reaper's periodic job, for beat.

    Left out of the schedule while every worker runs a flusher (``TASKYARD_BATCH__WORKER_FLUSHER``,
    the default): the flusher does the same scan in each worker's main process, so sending it
    through beat as well only put one high-level task per second on the broker (a third of the
    high queue's traffic in the demo). An explicit ``intervals_s`` entry for it schedules it.
    """
    return {
        REAP_TASK: PeriodicJob(
            settings.batch.reaper_interval_s, scheduled=not settings.batch.worker_flusher
        )
    }


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Register the reaper task; run a flusher thread in each worker's main process."""
    settings = runtime.settings.batch

    def reap_batches() -> dict[str, int]:
        """Flush aged batch buffers and republish batches whose lease ran out."""
        return reap(app)

    # Level high: a backlog of batches must not delay the runs that flush them. Not acked late:
    # a lost run is simply the next one. Beat sends it every reaper_interval_s only when the
    # workers run no flusher (worker_flusher=false) or the schedule names it: a flusher in every
    # worker's main process already scans as often, without a task on the broker per scan.
    # shared=False: each app's reaper task reaps that app, never another app of the process.
    register: Any = app.task(
        name=REAP_TASK,
        ignore_result=True,
        taskyard_level=Priority.HIGH,
        acks_late=False,
        shared=False,
    )
    register(reap_batches)

    if not settings.worker_flusher:
        return
    interval_s = settings.reaper_interval_s

    def make() -> Periodic:
        log.info("batch flusher started (every %.2f s)", interval_s)
        return flusher(app, interval_s)

    in_workers(app, make)
