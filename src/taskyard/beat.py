"""The beat schedule of the platform's periodic jobs, and single-flight runs.

Two beat processes started by mistake each send every periodic job; the job must still run once
per period. Two pieces make that hold:

* every taskyard entry uses :class:`aligned_every`, which fires at wall-clock multiples of the
  interval (``k * interval`` seconds since the epoch), so every beat process sends at the same
  instants whatever time it started;
* the task claims its period when it runs (:func:`claim_period`, a Redis ``SET NX``) and does
  nothing when the period is already claimed. :func:`single_flight` adds a lock for jobs that may
  outlast their period, so a slow run never overlaps the next one.

Any task may use :func:`single_flight`::

    with single_flight(runtime, "stats.collect", settings.monitoring.stats_interval_s) as flight:
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

from taskyard.config import Settings
from taskyard.runtime import Runtime

log = logging.getLogger(__name__)

#: Task names of the platform's periodic jobs (built in their own packages; named, not imported).
CACHE_WARM_TASK = "taskyard.cache.warm"
MAINTENANCE_TASK = "taskyard.maintenance.run"
BATCH_REAP_TASK = "taskyard.batching.reap"
STATS_COLLECT_TASK = "taskyard.stats.collect"

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


def default_intervals(settings: Settings) -> dict[str, float]:
    """Each platform job's period from its own section's setting (s)."""
    return {
        CACHE_WARM_TASK: settings.cache.warm_interval_s,
        MAINTENANCE_TASK: settings.maintenance.interval_s,
        BATCH_REAP_TASK: settings.batch.reaper_interval_s,
        STATS_COLLECT_TASK: settings.monitoring.stats_interval_s,
    }


def job_interval_s(settings: Settings, task: str) -> float:
    """The period (s) beat sends ``task`` at, and so the period its single-flight claims.

    ``TASKYARD_SCHEDULE__INTERVALS_S`` overrides the section's setting. The claim must use the
    same period as beat: a 3 s override claimed against a 300 s period would run once per 300 s.
    """
    interval = settings.schedule.intervals_s.get(task)
    if interval is None:
        interval = default_intervals(settings)[task]
    return max(MIN_BEAT_INTERVAL_S, interval)


def beat_entries(settings: Settings) -> dict[str, dict[str, Any]]:
    """Beat entries of the platform's periodic jobs, from settings (disabled ones left out).

    The batch reaper is left out while every worker runs a flusher thread
    (``TASKYARD_BATCH__WORKER_FLUSHER``, the default): the flusher does the same scan in each
    worker's main process, so sending it through beat as well only put one high-level task per
    second on the broker (a third of the high queue's traffic in the demo). An explicit
    ``intervals_s`` entry for it keeps it scheduled.
    """
    schedule_settings = settings.schedule
    intervals = default_intervals(settings)
    if settings.batch.worker_flusher and BATCH_REAP_TASK not in schedule_settings.intervals_s:
        del intervals[BATCH_REAP_TASK]
    intervals.update(schedule_settings.intervals_s)
    entries: dict[str, dict[str, Any]] = {}
    for task in intervals:
        if task in schedule_settings.disabled:
            continue
        # The same figure job_interval_s gives the job's single-flight claim.
        interval = max(MIN_BEAT_INTERVAL_S, intervals[task])
        entries[task] = {
            "task": task,
            "schedule": aligned_every(interval),
            # A run that could not start within its period is stale: the next one replaces it.
            "options": {"expires": interval},
        }
    return entries


class Scheduler(beat.PersistentScheduler):  # type: ignore[misc]
    """Celery's persistent scheduler, leaving out entries whose task this app does not define.

    Platform jobs are named by string; one whose package is not installed would otherwise be
    sent every period and rejected by every worker as unregistered.
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


def install(app: Any, runtime: Runtime) -> None:
    """Add the platform's periodic jobs to the app's beat schedule."""
    schedule_conf = dict(app.conf.beat_schedule or {})
    for name, entry in beat_entries(runtime.settings).items():
        schedule_conf.setdefault(name, entry)
    app.conf.beat_schedule = schedule_conf
    if app.conf.beat_scheduler == "celery.beat:PersistentScheduler":  # not chosen by the user
        app.conf.beat_scheduler = f"{__name__}:Scheduler"
