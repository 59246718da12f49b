"""A SQLAlchemy engine and sessions for tasks, from settings.

The pool follows the service this platform serves (``maintenance.pool_size`` 20, overflow 30,
timeout 30 s, recycle 3600 s, pre-ping). Engines belong to the app's runtime
(``runtime.engines``, per URL), so two apps never share one. Prefork children inherit the
parent's engines; each child disposes them when it starts (``worker_process_init``) so no
connection is ever shared between processes. SQLite engines keep SQLAlchemy's own pool: the
server pool options do not apply to a file.

Statements slower than ``maintenance.slow_statement_s`` are counted per task (the running Celery
task's name, "-" outside tasks) in ``keys.slow_statements()`` for the stats API.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import signals
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from taskyard.config import Settings
from taskyard.runtime import Runtime, TaskyardApp
from taskyard.serialization import text

log = logging.getLogger(__name__)

_LOCK = threading.Lock()


def engine_options(url: str, settings: Settings) -> dict[str, Any]:
    """``create_engine`` keyword arguments for ``url`` under ``settings``."""
    if make_url(url).get_backend_name() == "sqlite":
        return {}
    m = settings.maintenance
    return {
        "pool_size": m.pool_size,
        "max_overflow": m.max_overflow,
        "pool_timeout": m.pool_timeout_s,
        "pool_recycle": int(m.pool_recycle_s),
        "pool_pre_ping": True,
    }


def engine(runtime: Runtime, url: str | None = None) -> Engine:
    """The runtime's engine for ``url`` (default ``database_url``), created on first use."""
    target = url or runtime.settings.database_url
    engines = runtime.engines
    found = engines.get(target)
    if found is not None:
        return found
    with _LOCK:
        found = engines.get(target)
        if found is None:
            found = create_engine(target, **engine_options(target, runtime.settings))
            _count_slow_statements(found, runtime)
            engines[target] = found
    return found


@contextmanager
def session(runtime: Runtime, url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    with sessionmaker(engine(runtime, url))() as db, db.begin():
        yield db


def dispose_all(runtime: Runtime) -> None:
    """Drop every pooled connection of ``runtime`` this process inherited (without closing the
    parent's)."""
    with _LOCK:
        for eng in runtime.engines.values():
            # close=False: the sockets belong to the parent; the child only forgets them.
            eng.dispose(close=False)


def _current_task_name() -> str:
    from celery import current_task

    task = current_task
    name = getattr(task, "name", None) if task else None
    return name or "-"


def _count_slow_statements(eng: Engine, runtime: Runtime) -> None:
    threshold = runtime.settings.maintenance.slow_statement_s
    key = runtime.keys.slow_statements()

    @event.listens_for(eng, "before_cursor_execute")
    def _started(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        conn.info.setdefault("taskyard_started", []).append(time.perf_counter())

    @event.listens_for(eng, "after_cursor_execute")
    def _finished(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        stack = conn.info.get("taskyard_started")
        if not stack:
            return
        elapsed = time.perf_counter() - stack.pop()
        if elapsed < threshold:
            return
        task = _current_task_name()
        log.warning("slow statement in %s: %.3f s: %.200s", task, elapsed, statement)
        try:
            pipe = runtime.redis.pipeline(transaction=False)
            pipe.hincrby(key, task, 1)
            pipe.hincrbyfloat(key, f"{task}\x1fseconds", elapsed)
            pipe.execute()
        except redis.RedisError as exc:  # counting must never fail the statement
            log.warning("slow statement not counted: %s", exc)

    @event.listens_for(eng, "handle_error")
    def _failed(context: Any) -> None:
        conn = context.connection
        if conn is not None and conn.info.get("taskyard_started"):
            conn.info["taskyard_started"].pop()


def slow_statements(runtime: Runtime) -> dict[str, dict[str, float]]:
    """Slow statements per task as plain dicts: {task: {"count": n, "seconds": total}}."""
    raw = runtime.redis.hgetall(runtime.keys.slow_statements())
    result: dict[str, dict[str, float]] = {}
    for field_name, value in raw.items():
        name = text(field_name)
        task, _, kind = name.partition("\x1f")
        entry = result.setdefault(task, {"count": 0.0, "seconds": 0.0})
        entry["seconds" if kind == "seconds" else "count"] = float(value)
    return result


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Dispose inherited engines in every prefork child."""
    runtime_ref = weakref.ref(runtime)  # the receiver must not keep a finished app alive

    def on_process_init(**_: Any) -> None:
        target = runtime_ref()
        if target is not None:
            dispose_all(target)

    signals.worker_process_init.connect(on_process_init, weak=False)
