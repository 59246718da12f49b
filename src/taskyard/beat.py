"""The beat schedule of the parts' periodic jobs, and single-flight runs.

Each part declares its jobs (task name and period, :class:`~taskyard.runtime.PeriodicJob`);
``create_app`` collects them into ``runtime.periodic_jobs`` and this module schedules them,
knowing no task name of its own.

Two beat processes started by mistake each send every periodic job; the job must still run once
per period. Two pieces make that hold:

* every taskyard entry uses :class:`aligned_every`, which fires at wall-clock multiples of the
  interval (``k * interval`` seconds since the epoch), so every beat process sends at the same
  instants whatever time it started;
* the task claims its period when it runs (:func:`claim_period`, a Redis ``SET NX``) and does
  nothing when the period is already claimed. :func:`single_flight` adds a lock for jobs that may
  outlast their period, so a slow run never overlaps the next one.

Any task may use :func:`single_flight`::

    with single_flight(runtime, "reports.nightly", 24 * 3600) as flight:
        if not flight.acquired:
            return flight.report()
        ...
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import beat
from celery.schedules import schedstate, schedule

from taskyard.runtime import Runtime, TaskyardApp

log = logging.getLogger(__name__)


#: Shortest interval beat is asked to keep (s): beat's loop cannot usefully tick faster.
MIN_BEAT_INTERVAL_S = 1.0


def period_index(period_s: float, now: float | None = None) -> int:
    """Number of the period boundary nearest to ``now`` (s since the epoch).

    Beat sends at boundaries (:class:`aligned_every`); rounding to the nearest one lets a run that
    was delayed by less than half a period still count for the boundary that triggered it.
    """
    if period_s <= 0:
        raise ValueError(f"period_s must be > 0, got {period_s!r}")
    current = time.time() if now is None else now
    return math.floor(current / period_s + 0.5)


def claim_period(runtime: Runtime, job: str, period_s: float, *, now: float | None = None) -> bool:
    """Claim this period of ``job`` cluster-wide; False when another run already claimed it."""
    period = period_index(period_s, now)
    # The claim outlives its period twice over so a late duplicate still finds it; at least 1 s.
    ttl_ms = max(1000, math.ceil(2 * period_s * 1000))
    claimed = runtime.redis.set(
        runtime.keys.period_claim(job, period), uuid.uuid4().hex, nx=True, px=ttl_ms
    )
    return bool(claimed)


@dataclass
class Flight:
    """Outcome of trying to start a single-flight run."""

    job: str
    period: int
    acquired: bool
    #: "claimed" when acquired, "period-taken" or "still-running" when skipped.
    reason: str

    def report(self) -> dict[str, Any]:
        """A plain-dict result for a skipped (or started) run."""
        return {
            "job": self.job,
            "period": self.period,
            "skipped": not self.acquired,
            "reason": self.reason,
        }


@contextmanager
def single_flight(
    runtime: Runtime,
    job: str,
    period_s: float,
    *,
    lock_ttl_s: float | None = None,
    now: float | None = None,
) -> Iterator[Flight]:
    """Run the body at most once per period of ``job`` across the cluster.

    With ``lock_ttl_s``, the run also holds a Redis lock (``keys.lock(job)``) until the body ends
    or the TTL passes, so a run outlasting its period makes the next period skip rather than
    overlap. The TTL bounds how long a crashed run blocks the job.
    """
    period = period_index(period_s, now)
    if not claim_period(runtime, job, period_s, now=now):
        log.info("single-flight %s: period %d already claimed, skipping", job, period)
        yield Flight(job, period, False, "period-taken")
        return
    if lock_ttl_s is None:
        yield Flight(job, period, True, "claimed")
        return
    lock = runtime.redis.lock(runtime.keys.lock(job), timeout=lock_ttl_s, blocking=False)
    if not lock.acquire():
        log.warning("single-flight %s: previous run still holds the lock, skipping", job)
        yield Flight(job, period, False, "still-running")
        return
    try:
        yield Flight(job, period, True, "claimed")
    finally:
        try:
            lock.release()
        except Exception:  # the TTL ran out mid-run; nothing left to release
            log.warning("single-flight %s: lock expired before the run ended", job)


class aligned_every(schedule):  # type: ignore[misc]
    """Beat schedule firing at wall-clock multiples of an interval, in every beat process alike."""

    def is_due(self, last_run_at: datetime) -> schedstate:
        interval = max(self.seconds, 1e-3)
        now = self.now().timestamp()
        boundary = math.floor(now / interval) * interval
        until_next = boundary + interval - now
        last = self.maybe_make_aware(last_run_at).timestamp()
        if last < boundary:
            return schedstate(is_due=True, next=until_next)
        return schedstate(is_due=False, next=until_next)

    def __repr__(self) -> str:
        return f"<aligned every {self.human_seconds}>"


def job_interval_s(runtime: Runtime, task: str) -> float:
    """The period (s) beat sends ``task`` at, and so the period its single-flight claims.

    ``TASKYARD_SCHEDULE__INTERVALS_S`` overrides the part's setting. The claim must use the
    same period as beat: a 3 s override claimed against a 300 s period would run once per 300 s.
    """
    interval = runtime.settings.schedule.intervals_s.get(task)
    if interval is None:
        interval = runtime.periodic_jobs[task].period_s
    return max(MIN_BEAT_INTERVAL_S, interval)


def beat_entries(runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Beat entries of the app's periodic jobs, from settings (disabled ones left out).

    A job its part declares unscheduled (the batch reaper while every worker runs a flusher)
    is sent only when ``TASKYARD_SCHEDULE__INTERVALS_S`` names it.
    """
    schedule_settings = runtime.settings.schedule
    entries: dict[str, dict[str, Any]] = {}
    for task, job in runtime.periodic_jobs.items():
        named = task in schedule_settings.intervals_s
        if task in schedule_settings.disabled or not (job.scheduled or named):
            continue
        # The same figure job_interval_s gives the job's single-flight claim.
        interval = job_interval_s(runtime, task)
        entries[task] = {
            "task": task,
            "schedule": aligned_every(interval),
            # A run that could not start within its period is stale: the next one replaces it.
            "options": {"expires": interval},
        }
    return entries


class Scheduler(beat.PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, leaving out entries whose task this app does not define.

    A schedule entry names its task by string; one of taskyard's whose part is not installed
    would otherwise be sent every period and rejected by every worker as unregistered.
    """

    def merge_inplace(self, b: dict[str, Any]) -> None:
        known = set(self.app.tasks)
        kept = {}
        for name, entry in b.items():
            task = entry.get("task", name)
            if task.startswith("taskyard.") and task not in known:
                log.warning("beat: leaving out %s, task %s is not registered", name, task)
                continue
            kept[name] = entry
        super().merge_inplace(kept)


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Add the parts' periodic jobs (``runtime.periodic_jobs``) to the app's beat schedule."""
    schedule_conf = dict(app.conf.beat_schedule or {})
    for name, entry in beat_entries(runtime).items():
        schedule_conf.setdefault(name, entry)
    app.conf.beat_schedule = schedule_conf
    if app.conf.beat_scheduler == "celery.beat:PersistentScheduler":  # not chosen by the user
        app.conf.beat_scheduler = f"{__name__}:Scheduler"
