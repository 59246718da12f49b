"""Index maintenance of the application database: the run, its history, the periodic task.

``run_maintenance`` maintains the indexes declared by the SQLAlchemy metadata named in
``TASKYARD_MAINTENANCE__METADATA`` on ``TASKYARD_DATABASE_URL`` (PostgreSQL or SQLite), records
the run in the history database and keeps its report in Redis (``keys.maintenance_last``). It
never raises for a database problem: the run is recorded as failed with the reason.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from sqlalchemy import MetaData
from sqlalchemy.engine import make_url

from taskyard.beat import job_interval_s, single_flight
from taskyard.config import Settings
from taskyard.errors import ConfigurationError
from taskyard.maintenance.postgres import PostgresMaintenance
from taskyard.maintenance.report import RunReport, last_runs, record, safe_url
from taskyard.maintenance.sqlite import SqliteMaintenance
from taskyard.routing.levels import Priority
from taskyard.runtime import PeriodicJob, Runtime, TaskyardApp, runtime_of

log = logging.getLogger(__name__)
#: The maintenance task, sent by beat every TASKYARD_MAINTENANCE__INTERVAL_S.
MAINTENANCE_TASK = "taskyard.maintenance.run"

METADATA_SETTING = "TASKYARD_MAINTENANCE__METADATA"
#: Job name of the periodic run's single-flight claim.
MAINTENANCE_JOB = "maintenance.run"

__all__ = [
    "RunReport",
    "last_report",
    "last_runs",
    "load_metadata",
    "recent_runs",
    "run_maintenance",
]


def load_metadata(path: str) -> MetaData:
    """Import the SQLAlchemy MetaData at ``"module:attribute.path"``.

    Raises:
        ConfigurationError: the path is malformed, does not import, or is not a MetaData; the
            message names ``TASKYARD_MAINTENANCE__METADATA``.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"{METADATA_SETTING}={path!r} must look like 'package.module:Base.metadata'",
            setting=METADATA_SETTING,
            value=path,
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{METADATA_SETTING}={path!r}: cannot import module {module_name!r} ({exc})",
            setting=METADATA_SETTING,
            value=path,
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(
                f"{METADATA_SETTING}={path!r}: {module_name} has no attribute {attribute!r}",
                setting=METADATA_SETTING,
                value=path,
            )
        target = getattr(target, part)
    if not isinstance(target, MetaData):
        raise ConfigurationError(
            f"{METADATA_SETTING}={path!r} is a {type(target).__name__}, not a SQLAlchemy MetaData",
            setting=METADATA_SETTING,
            value=path,
        )
    return target


def run_maintenance(
    runtime: Runtime,
    *,
    dry_run: bool = False,
    metadata: MetaData | None = None,
    url: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> RunReport:
    """Maintain the declared indexes now; record and return the report.

    ``metadata`` and ``url`` default to the settings. With ``dry_run`` the statements are
    reported (and passed to ``echo``) but nothing is changed.

    Raises:
        ConfigurationError: the metadata setting names nothing importable (before any work).
    """
    settings = runtime.settings
    target_url = url or settings.database_url
    if metadata is None and not settings.maintenance.metadata:
        report = RunReport(
            dialect="",
            database=safe_url(target_url),
            dry_run=dry_run,
            status="skipped",
            reason=f"{METADATA_SETTING} is not set: no declared indexes to maintain",
        )
        if not record(settings.effective_history_url, report):
            report.errors.append("run not recorded in the history database")
        _publish(runtime, report)
        log.info("maintenance skipped: %s", report.reason)
        return report
    declared = metadata if metadata is not None else load_metadata(settings.maintenance.metadata)
    try:
        dialect = make_url(target_url).get_backend_name()
    except Exception as exc:
        raise ConfigurationError(
            f"TASKYARD_DATABASE_URL={target_url!r} is not a database URL ({exc})",
            setting="TASKYARD_DATABASE_URL",
            value=target_url,
        ) from None
    report = RunReport(dialect=dialect, database=safe_url(target_url), dry_run=dry_run)
    started = time.perf_counter()
    try:
        if dialect == "postgresql":
            PostgresMaintenance(
                target_url,
                declared,
                settings.maintenance,
                report,
                namespace=settings.namespace,
                echo=echo,
            ).run()
        elif dialect == "sqlite":
            SqliteMaintenance(target_url, declared, settings.maintenance, report, echo=echo).run()
        else:
            report.fail(f"unsupported database {dialect!r}; maintained are postgresql, sqlite")
    except Exception as exc:  # a bug or surprise must not take the worker down
        log.exception("maintenance run failed")
        report.fail(f"unexpected error: {type(exc).__name__}: {exc}")
    report.duration_s = round(time.perf_counter() - started, 6)
    recorded = record(settings.effective_history_url, report)
    if not recorded:
        report.errors.append("run not recorded in the history database")
    _publish(runtime, report)
    log.info(
        "maintenance %s on %s: %s, %d actions, %d errors in %.2f s",
        report.run_id,
        report.database,
        report.status,
        len(report.actions),
        len(report.errors),
        report.duration_s,
    )
    return report


def _publish(runtime: Runtime, report: RunReport) -> None:
    try:
        runtime.redis.set(
            runtime.keys.maintenance_last(), json.dumps(report.as_dict(), default=str)
        )
    except redis.RedisError as exc:
        log.warning("maintenance report not published to Redis: %s", exc)


def last_report(runtime: Runtime) -> dict[str, Any] | None:
    """The last run's report from Redis, as a plain dict (None before the first run)."""
    raw = runtime.redis.get(runtime.keys.maintenance_last())
    return None if raw is None else dict(json.loads(raw))


def recent_runs(runtime: Runtime, limit: int = 10) -> list[dict[str, Any]]:
    """The latest runs from the history database, newest first, as plain dicts."""
    return last_runs(runtime.settings.effective_history_url, limit)


def periodic_run(runtime: Runtime) -> dict[str, Any]:
    """The periodic job: one run per maintenance period cluster-wide."""
    period_s = job_interval_s(runtime, MAINTENANCE_TASK)
    # No Redis lock on top of the claim: the advisory lock in the database keeps runs apart,
    # whoever starts them, and dies with a crashed run's connection, where a Redis lock would
    # outlive the crash and make the next day's run skip.
    with single_flight(runtime, MAINTENANCE_JOB, period_s) as flight:
        if not flight.acquired:
            return flight.report()
        try:
            report = run_maintenance(runtime)
        except ConfigurationError as exc:
            report = RunReport(
                dialect="-", database=safe_url(runtime.settings.database_url), dry_run=False
            )
            report.fail(str(exc))
            record(runtime.settings.effective_history_url, report)
            _publish(runtime, report)
        summary = {k: v for k, v in report.as_dict().items() if k != "findings"}
        return {**summary, "period": flight.period, "skipped": False}


def periodic_jobs(settings: Settings) -> dict[str, PeriodicJob]:
    """Index maintenance's periodic job, for beat."""
    return {MAINTENANCE_TASK: PeriodicJob(settings.maintenance.interval_s)}


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Register ``taskyard.maintenance.run``; check the metadata setting when a worker starts."""

    @app.task(name=MAINTENANCE_TASK, bind=True, shared=False, taskyard_level=Priority.LOW)  # type: ignore[untyped-decorator]
    def maintenance_task(self: Any) -> dict[str, Any]:
        return periodic_run(runtime_of(self.app))

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app or not runtime.settings.maintenance.metadata:
            return
        try:
            load_metadata(runtime.settings.maintenance.metadata)
        except ConfigurationError as exc:
            # Logged, not raised: a maintenance setting must not stop the worker's other work.
            log.error("index maintenance will fail: %s", exc)

    signals.worker_init.connect(on_worker_init, weak=False)
