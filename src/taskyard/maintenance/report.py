"""What a maintenance run did, and where it is kept: the history database and Redis."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    desc,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

history_metadata = MetaData()

#: One row per maintenance run (dry runs and skipped runs included).
runs_table = Table(
    "taskyard_maintenance_runs",
    history_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(32), nullable=False, index=True),
    Column("started_at", Float, nullable=False, index=True),
    Column("duration_s", Float, nullable=False),
    Column("dialect", String(20), nullable=False),
    Column("database", String(255), nullable=False),
    Column("dry_run", Boolean, nullable=False),
    Column("status", String(10), nullable=False),
    Column("reason", Text),
    Column("actions", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("report", Text, nullable=False),
)


@dataclass
class Action:
    """One statement of a run: planned (dry run), done, failed or skipped."""

    kind: str  # create, rebuild, drop, reindex, analyze, optimize, check
    target: str
    statement: str
    status: str = "planned"
    duration_s: float = 0.0
    attempts: int = 0
    error: str | None = None


@dataclass
class RunReport:
    """A maintenance run: its actions, findings and outcome."""

    dialect: str
    database: str
    dry_run: bool
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_at: float = field(default_factory=time.time)
    duration_s: float = 0.0
    #: "ok", "failed" (any error; see errors) or "skipped" (another run holds the lock, or no
    #: metadata is configured).
    status: str = "ok"
    reason: str | None = None
    actions: list[Action] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Reports that change nothing: unused, duplicate, redundant, bloated, in-progress indexes...
    findings: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.errors.append(reason)
        self.status = "failed"
        self.reason = self.reason or reason

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def safe_url(url: str) -> str:
    """The URL without its password, for reports."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable url>"


def record(history_url: str, report: RunReport) -> bool:
    """Insert the run into the history database; False (logged) when that fails."""
    payload = json.dumps(report.as_dict(), default=str)
    engine = create_engine(history_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            history_metadata.create_all(conn, checkfirst=True)
            conn.execute(
                runs_table.insert().values(
                    run_id=report.run_id,
                    started_at=report.started_at,
                    duration_s=report.duration_s,
                    dialect=report.dialect,
                    database=report.database[:255],
                    dry_run=report.dry_run,
                    status=report.status,
                    reason=report.reason,
                    actions=len(report.actions),
                    errors=len(report.errors),
                    report=payload,
                )
            )
        return True
    except SQLAlchemyError as exc:
        log.error(
            "maintenance run %s not recorded in %s: %s", report.run_id, safe_url(history_url), exc
        )
        return False
    finally:
        engine.dispose()


def last_runs(history_url: str, limit: int = 10) -> list[dict[str, Any]]:
    """The latest runs from the history database, newest first, as plain dicts."""
    engine = create_engine(history_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not engine.dialect.has_table(conn, runs_table.name):
                return []
            rows = (
                conn.execute(
                    select(runs_table).order_by(desc(runs_table.c.started_at)).limit(limit)
                )
                .mappings()
                .all()
            )
    finally:
        engine.dispose()
    result = []
    for row in rows:
        entry = dict(row)
        entry["report"] = json.loads(entry["report"])
        result.append(entry)
    return result
