"""The task database engine: pool settings, a fresh pool per prefork child, slow statements."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

from celery import signals
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from taskyard.database import engine, engine_options, session, slow_statements
from taskyard.runtime import runtime_of
from tests import servers


def test_pool_settings_for_servers_not_sqlite(make_app: Any, tmp_path: Path) -> None:
    servers.require("postgresql")
    runtime = runtime_of(make_app("db-test", database_url=servers.POSTGRES_URL))
    assert engine_options(servers.POSTGRES_URL, runtime.settings) == {
        "pool_size": 20,
        "max_overflow": 30,
        "pool_timeout": 30.0,
        "pool_recycle": 3600,
        "pool_pre_ping": True,
    }
    eng = engine(runtime)
    assert eng is engine(runtime)
    assert eng.pool.size() == 20 and eng.pool._max_overflow == 30  # type: ignore[attr-defined]
    assert eng.pool._pre_ping and eng.pool._recycle == 3600  # type: ignore[attr-defined]
    assert engine_options(f"sqlite:///{tmp_path}/x.db", runtime.settings) == {}
    with session(runtime, f"sqlite:///{tmp_path}/x.db") as db:
        assert db.execute(text("SELECT 1")).scalar() == 1


def _child(runtime: Any, queue: Any) -> None:
    # What a prefork child does when it starts.
    signals.worker_process_init.send(sender=None)
    with runtime.engines[servers.POSTGRES_URL].connect() as conn:
        queue.put(conn.execute(text("SELECT pg_backend_pid()")).scalar())


def test_engines_belong_to_their_runtime(make_app: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    first = runtime_of(make_app("db-a", database_url=url))
    second = runtime_of(make_app("db-b", database_url=url))
    assert engine(first) is engine(first) is first.engines[url]
    assert engine(second) is not engine(first)


def test_prefork_child_gets_its_own_connections(make_app: Any) -> None:
    servers.require("postgresql")
    runtime = runtime_of(make_app("db-test", database_url=servers.POSTGRES_URL))
    eng = engine(runtime)
    with eng.connect() as conn:
        parent_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    assert isinstance(eng.pool, QueuePool)
    assert eng.pool.checkedin() == 1  # a pooled connection the child would inherit
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(runtime, queue))
    child.start()
    child_pid = queue.get(timeout=20)
    child.join(20)
    assert child.exitcode == 0
    assert child_pid != parent_pid
    with eng.connect() as conn:  # the parent's connection survived the child's dispose
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == parent_pid


def test_slow_statements_counted_per_task(make_app: Any) -> None:
    servers.require("postgresql")
    app = make_app(
        "db-test", database_url=servers.POSTGRES_URL, maintenance={"slow_statement_s": 0.05}
    )
    runtime = runtime_of(app)

    @app.task(name="t.slow_query", shared=False)
    def slow_query() -> None:
        with session(runtime) as db:
            db.execute(text("SELECT pg_sleep(0.08)"))
            db.execute(text("SELECT 1"))  # fast: not counted

    slow_query.apply()
    slow_query.apply()
    with session(runtime) as db:
        db.execute(text("SELECT pg_sleep(0.06)"))
    counted = slow_statements(runtime)
    assert counted["t.slow_query"]["count"] == 2
    assert counted["t.slow_query"]["seconds"] >= 0.16
    assert counted["-"]["count"] == 1
