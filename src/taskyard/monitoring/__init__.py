"""Monitoring: capture in workers, true queue depth, stats collection, alerts, the read store.

``install`` is what ``create_app`` calls: it connects the capture receivers and registers the
``taskyard.stats.collect`` task. It does no I/O.
"""

from __future__ import annotations

from taskyard.config import Settings
from taskyard.runtime import PeriodicJob, Runtime, TaskyardApp


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Connect metric capture and register the stats collection task on ``app``."""
    from taskyard.monitoring.capture import install_capture
    from taskyard.monitoring.collect import register

    install_capture(app, runtime)
    register(app, runtime)


def periodic_jobs(settings: Settings) -> dict[str, PeriodicJob]:
    """Monitoring's periodic job (stats collection), for beat."""
    from taskyard.monitoring.collect import periodic_jobs as collection_jobs

    return collection_jobs(settings)
