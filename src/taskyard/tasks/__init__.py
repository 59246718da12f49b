"""Periodic jobs of the platform: cache (+ warmers), index maintenance, the beat schedule."""

from __future__ import annotations

from typing import Any

from taskyard.runtime import Runtime


def install(app: Any, runtime: Runtime) -> None:
    """Register the periodic tasks, the database hooks and the beat schedule (no I/O)."""
    from taskyard.tasks import db, maintenance, schedule, warming

    db.install(app, runtime)
    warming.install(app, runtime)
    maintenance.install(app, runtime)
    schedule.install(app, runtime)
