"""The stats history database: snapshots and alert episodes, rolled up and pruned.

Redis keeps the recent snapshots (capped lists); this database keeps the long tail. Raw
snapshots (one per collection) are kept for ``history_raw_keep_s``; older ones are downsampled to
the last snapshot of each ``history_rollup_s`` window (snapshots carry cumulative counters and
current gauges, so the last one of a window is a faithful reading at that moment). Rows older
than ``history_retention_days`` are deleted. SQLite by default, PostgreSQL in production; only
portable SQLAlchemy Core is used.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

snapshots = sa.Table(
    "taskyard_stats_snapshots",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    # 0 for a raw snapshot, else the width (s) of the window it stands for after rollup.
    sa.Column("resolution_s", sa.Float, nullable=False, default=0.0),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_taskyard_stats_snapshots_series_at", "series", "at"),
)

alert_episodes = sa.Table(
    "taskyard_alert_episodes",
    metadata,
    # "<alert id>@<since>": one row per firing episode of one alert.
    sa.Column("episode", sa.String(512), primary_key=True),
    sa.Column("alert_id", sa.String(400), nullable=False),
    sa.Column("alertname", sa.String(128), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("value", sa.Float, nullable=True),
    sa.Column("threshold", sa.Float, nullable=True),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Index("ix_taskyard_alert_episodes_since", "since"),
)

task_events = sa.Table(
    "taskyard_task_events",
    metadata,
    # One row per event of one task's timeline (sent, received, started, deferred, retried,
    # succeeded, failed, dead), moved here from Redis by the stats collection (timeline.py).
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(255), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("queue", sa.String(255), nullable=False),
    sa.Column("worker", sa.String(255), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Index("ix_taskyard_task_events_task_id", "task_id"),
    sa.Index("ix_taskyard_task_events_at", "at"),
)

_engines: dict[str, Engine] = {}
_created: set[str] = set()
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # Connections opened by the parent must not be used, nor closed, by a forked child (closing
    # would end the parent's sessions): forget them, and let the child open its own.
    global _lock
    _lock = threading.Lock()
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def engine_for(url: str) -> Engine:
    """One engine per URL and process (engines pool connections; creating one does no I/O)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                # The API serves from threads; SQLite connections must be shareable.
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 10}
            engine = sa.create_engine(url, **kwargs)
            _engines[url] = engine
        return engine


def ensure_schema(engine: Engine) -> None:
    """Create the history tables when missing (once per engine and process)."""
    key = str(engine.url)
    if key in _created:
        return
    metadata.create_all(engine, checkfirst=True)
    _created.add(key)


def write_snapshots(engine: Engine, rows: Iterable[tuple[str, float, dict[str, Any]]]) -> int:
    """Insert raw snapshots ``(series, at, data)``; returns how many."""
    values = [
        {"series": s, "at": at, "resolution_s": 0.0, "data": json.dumps(data)}
        for s, at, data in rows
    ]
    if not values:
        return 0
    with engine.begin() as conn:
        conn.execute(snapshots.insert(), values)
    return len(values)


def read_snapshots(
    engine: Engine, series: str, since: float | None, until: float | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Snapshots of one series in ``[since, until]``, newest first."""
    query = sa.select(snapshots.c.at, snapshots.c.resolution_s, snapshots.c.data).where(
        snapshots.c.series == series
    )
    if since is not None:
        query = query.where(snapshots.c.at >= since)
    if until is not None:
        query = query.where(snapshots.c.at <= until)
    query = query.order_by(snapshots.c.at.desc(), snapshots.c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        result = conn.execute(query).all()
    out = []
    for at, resolution_s, data in result:
        item = json.loads(data)
        item.setdefault("at", at)
        if resolution_s:
            item["resolution_s"] = resolution_s
        out.append(item)
    return out


def count_snapshots(engine: Engine, series: str, until: float | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(snapshots).where(snapshots.c.series == series)
    if until is not None:
        query = query.where(snapshots.c.at <= until)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def save_alerts(engine: Engine, alerts: Sequence[dict[str, Any]]) -> None:
    """Upsert alert episodes (one row per alert id and firing start)."""
    if not alerts:
        return
    with engine.begin() as conn:
        for alert in alerts:
            episode = f"{alert['id']}@{alert['since']:.3f}"
            values = {
                "alert_id": alert["id"],
                "alertname": alert["alertname"],
                "severity": alert["severity"],
                "state": alert["state"],
                "since": alert["since"],
                "resolved_at": alert.get("resolved_at"),
                "value": alert.get("value"),
                "threshold": alert.get("threshold"),
                "labels": json.dumps(alert.get("labels", {}), sort_keys=True),
                "summary": alert.get("summary", ""),
            }
            updated = conn.execute(
                alert_episodes.update().where(alert_episodes.c.episode == episode).values(**values)
            )
            if updated.rowcount == 0:
                conn.execute(alert_episodes.insert().values(episode=episode, **values))


def read_alert_episodes(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    """Alert episodes, most recent first."""
    query = sa.select(alert_episodes).order_by(alert_episodes.c.since.desc()).limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        {
            "id": r["alert_id"],
            "alertname": r["alertname"],
            "severity": r["severity"],
            "state": r["state"],
            "since": r["since"],
            "resolved_at": r["resolved_at"],
            "value": r["value"],
            "threshold": r["threshold"],
            "labels": json.loads(r["labels"]),
            "summary": r["summary"],
        }
        for r in rows
    ]


def rollup(
    engine: Engine, now: float, raw_keep_s: float, window_s: float, chunk: int = 5000
) -> int:
    """Downsample raw snapshots older than ``raw_keep_s`` to the last one per ``window_s``
    window and series; returns how many rows were deleted."""
    cutoff = now - raw_keep_s
    deleted = 0
    with engine.begin() as conn:
        rows = conn.execute(
            sa.select(snapshots.c.id, snapshots.c.series, snapshots.c.at)
            .where(snapshots.c.resolution_s == 0.0, snapshots.c.at < cutoff)
            .order_by(snapshots.c.at, snapshots.c.id)
        ).all()
        keep: dict[tuple[str, int], int] = {}
        drop: list[int] = []
        for row_id, series, at in rows:
            window = (series, int(at // window_s))
            previous = keep.get(window)
            if previous is not None:
                drop.append(previous)
            keep[window] = row_id
        for start in range(0, len(drop), chunk):
            part = drop[start : start + chunk]
            conn.execute(snapshots.delete().where(snapshots.c.id.in_(part)))
            deleted += len(part)
        kept = list(keep.values())
        for start in range(0, len(kept), chunk):
            conn.execute(
                snapshots.update()
                .where(snapshots.c.id.in_(kept[start : start + chunk]))
                .values(resolution_s=window_s)
            )
    return deleted


def prune(engine: Engine, now: float, retention_s: float) -> int:
    """Delete snapshots and resolved alert episodes older than the retention; returns rows."""
    cutoff = now - retention_s
    with engine.begin() as conn:
        gone = conn.execute(snapshots.delete().where(snapshots.c.at < cutoff)).rowcount
        gone += conn.execute(
            alert_episodes.delete().where(
                alert_episodes.c.resolved_at.is_not(None), alert_episodes.c.resolved_at < cutoff
            )
        ).rowcount
    return int(gone)


def check(engine: Engine) -> None:
    """Run ``SELECT 1``; raises the driver's error when the database is unreachable."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
