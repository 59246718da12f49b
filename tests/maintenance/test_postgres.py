"""Index maintenance on the real PostgreSQL server, each test in its own schema."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.bdc.models import Base
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    text,
)

from taskyard.maintenance import recent_runs, run_maintenance
from taskyard.runtime import runtime_of
from tests import servers

ROWS = 300_000


@pytest.fixture
def pg() -> Iterator[tuple[Engine, str]]:
    """An engine on the test database and a fresh schema of our own, dropped afterwards."""
    servers.require("postgresql")
    engine = create_engine(servers.POSTGRES_URL, isolation_level="AUTOCOMMIT")
    schema = f"periodic_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    yield engine, schema
    with engine.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def _events(schema: str) -> MetaData:
    md = MetaData(schema=schema)
    Table(
        "events",
        md,
        Column("id", Integer, primary_key=True),
        Column("account", Integer, nullable=False),
        Column("code", String(20)),
        Column("status", String(10), nullable=False),
        Column("created_at", DateTime, nullable=False),
        Index("ix_events_account_created", "account", "created_at"),
        Index("ix_events_open", "created_at", postgresql_where=text("status = 'open'")),
        Index("ix_events_code", "code", unique=True),
    )
    return md


def _create(engine: Engine, md: MetaData, *, drop: tuple[str, ...] = (), rows: int = 0) -> None:
    md.create_all(engine)
    schema = md.schema
    with engine.connect() as conn:
        for name in drop:
            conn.execute(text(f"DROP INDEX {schema}.{name}"))
        if rows:
            conn.execute(
                text(
                    f"INSERT INTO {schema}.events (account, code, status, created_at) "
                    "SELECT g % 1000, 'c' || g, CASE WHEN g % 10 = 0 THEN 'open' ELSE 'done' END, "
                    "now() - (g || ' seconds')::interval FROM generate_series(1, :n) g"
                ),
                {"n": rows},
            )


def _index(engine: Engine, schema: str, name: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = (
            conn.execute(
                text(
                    "SELECT x.indisvalid, pg_get_indexdef(x.indexrelid) AS definition "
                    "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
                    "JOIN pg_namespace n ON n.oid = i.relnamespace "
                    "WHERE n.nspname = :s AND i.relname = :n"
                ),
                {"s": schema, "n": name},
            )
            .mappings()
            .first()
        )
    return None if row is None else dict(row)


def _runtime(make_app: Any, tmp_path: Path, **maintenance: Any) -> Any:
    app = make_app(
        "maint-pg",
        database_url=servers.POSTGRES_URL,
        history_database_url=f"sqlite:///{tmp_path / 'history.db'}",
        maintenance=maintenance,
    )
    return runtime_of(app)


def test_missing_index_built_concurrently_while_writes_continue(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_account_created",), rows=ROWS)
    writes: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        with engine.connect() as conn:
            while not stop.is_set():
                try:
                    conn.execute(
                        text(
                            f"INSERT INTO {schema}.events (account, code, status, "
                            "created_at) VALUES (1, NULL, 'open', now())"
                        )
                    )
                    writes.append(time.monotonic())
                except Exception as exc:
                    errors.append(exc)
                    return
                time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        started = time.monotonic()
        report = run_maintenance(_runtime(make_app, tmp_path), metadata=md)
        finished = time.monotonic()
    finally:
        stop.set()
        thread.join(10)
    assert report.status == "ok", report.errors
    create = [a for a in report.actions if a.kind == "create"]
    assert [a.statement.split(" ON ")[0] for a in create] == [
        "CREATE INDEX CONCURRENTLY ix_events_account_created"
    ]
    assert create[0].duration_s > 0.1
    assert not errors
    during = [t for t in writes if started <= t <= finished]
    assert len(during) > 20, "the writer made no progress during the build"
    gaps = [b - a for a, b in itertools.pairwise(during)]
    # A plain CREATE INDEX would block the writer for the whole build.
    assert max(gaps) < create[0].duration_s
    found = _index(engine, schema, "ix_events_account_created")
    assert found is not None and found["indisvalid"]
    with engine.connect() as conn:
        count = conn.execute(text(f"SELECT count(*) FROM {schema}.events")).scalar()
    assert count == ROWS + len(writes)


def test_invalid_indexes_are_repaired(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_code",), rows=1000)
    with engine.connect() as conn:
        conn.execute(text(f"UPDATE {schema}.events SET code = 'dup' WHERE id <= 2"))
        for name in ("ix_events_code", "ix_extra_code"):  # declared, and one nobody declared
            with pytest.raises(Exception, match="could not create unique index"):
                conn.execute(
                    text(f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {schema}.events (code)")
                )
    assert _index(engine, schema, "ix_events_code") == {
        "indisvalid": False,
        "definition": _index(engine, schema, "ix_events_code")["definition"],
    }
    runtime = _runtime(make_app, tmp_path)
    failing = run_maintenance(runtime, metadata=md)  # duplicates still there: recorded failed
    assert failing.status == "failed" and "could not create unique index" in failing.errors[0]
    tried = [(a.kind, a.status) for a in failing.actions if a.target.endswith("ix_events_code")]
    assert tried == [("drop", "done"), ("create", "failed")]  # the failed build was cleaned up
    with engine.connect() as conn:
        conn.execute(text(f"UPDATE {schema}.events SET code = 'dup2' WHERE id = 2"))
    report = run_maintenance(runtime, metadata=md)
    assert report.status == "ok", report.errors
    done = {(a.kind, a.target.split(".")[-1]) for a in report.actions if a.status == "done"}
    assert {("create", "ix_events_code"), ("rebuild", "ix_extra_code")} <= done
    assert _index(engine, schema, "ix_events_code")["indisvalid"]  # type: ignore[index]
    assert _index(engine, schema, "ix_extra_code")["indisvalid"]  # type: ignore[index]
    assert report.findings["invalid"] == []
    assert [r["status"] for r in recent_runs(runtime)] == ["ok", "failed"]


def test_index_being_built_is_never_touched(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_code",), rows=1000)
    # An open snapshot keeps a concurrent build waiting in its last phase, index still invalid.
    holder = engine.connect().execution_options(isolation_level="REPEATABLE READ")
    holder.begin()
    holder.execute(text(f"SELECT count(*) FROM {schema}.events"))
    built: list[BaseException | None] = []

    def build() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(
                    text(
                        f"CREATE UNIQUE INDEX CONCURRENTLY ix_events_code ON {schema}.events (code)"
                    )
                )
            built.append(None)
        except BaseException as exc:
            built.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while (_index(engine, schema, "ix_events_code") is None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _index(engine, schema, "ix_events_code")["indisvalid"] is False  # type: ignore[index]
        report = run_maintenance(_runtime(make_app, tmp_path), metadata=md)
        skipped = [a for a in report.actions if a.target.endswith("ix_events_code")]
        assert [a.status for a in skipped] == ["skipped"]
        assert "in progress" in (skipped[0].error or "")
        assert report.findings["builds_in_progress"]
        assert _index(engine, schema, "ix_events_code") is not None  # not dropped
    finally:
        holder.rollback()
        holder.close()
        thread.join(30)
    assert built == [None]
    assert _index(engine, schema, "ix_events_code")["indisvalid"]  # type: ignore[index]


def test_partial_index_and_findings_on_example_models(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = MetaData(schema=schema)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(md, schema=schema)
    md.create_all(engine)
    with engine.connect() as conn:
        conn.execute(text(f"DROP INDEX {schema}.ix_appointments_upcoming_scheduled"))
        conn.execute(text(f"DROP INDEX {schema}.ix_evaluations_pending"))
        # Undeclared: an exact duplicate, and one made redundant by a composite index.
        conn.execute(text(f"CREATE INDEX ix_dup_status ON {schema}.appointments (status)"))
        conn.execute(text(f"CREATE INDEX ix_users_role_only ON {schema}.users (role)"))
    printed: list[str] = []
    runtime = _runtime(make_app, tmp_path)
    dry = run_maintenance(runtime, metadata=md, dry_run=True, echo=printed.append)
    assert dry.status == "ok" and all(a.status == "planned" for a in dry.actions)
    assert _index(engine, schema, "ix_appointments_upcoming_scheduled") is None  # unchanged
    assert any(
        "CREATE INDEX CONCURRENTLY ix_appointments_upcoming_scheduled" in line
        and "WHERE status = 'scheduled'" in line
        for line in printed
    )
    assert any(line.startswith("ANALYZE") for line in printed)

    report = run_maintenance(runtime, metadata=md)
    assert report.status == "ok", report.errors
    partial = _index(engine, schema, "ix_appointments_upcoming_scheduled")
    assert partial is not None and partial["indisvalid"]
    assert "WHERE ((status)::text = 'scheduled'::text)" in partial["definition"]
    assert (
        "WHERE ((status)::text = 'pending'::text)"
        in _index(engine, schema, "ix_evaluations_pending")["definition"]
    )  # type: ignore[index]
    findings = report.findings
    dup = [d for d in findings["duplicates"] if d["table"] == "appointments"]
    assert len(dup) == 1 and dup[0]["columns"] == ["status"]
    # ix_dup_status duplicates the index that status's index=True declares.
    assert dup[0]["indexes"][0] == "ix_dup_status"
    assert dup[0]["indexes"][1].endswith("appointments_status")
    assert any(
        r["index"] == "ix_users_role_only" and r["covered_by"] == "ix_users_role_is_active"
        for r in findings["redundant"]
    )
    unused = {u["index"] for u in findings["unused"]}
    assert "ix_dup_status" in unused and "users_pkey" not in unused
    assert findings["stats_age_s"] > 0
    assert isinstance(findings["bloat"], list)


def test_two_concurrent_runs_one_works_other_skips(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_account_created",), rows=1000)
    # A long transaction holding a conflicting lock makes the first run wait (lock_timeout and
    # retries) while it holds the advisory lock.
    blocker = engine.connect().execution_options(isolation_level="READ COMMITTED")
    blocker.begin()
    blocker.execute(text(f"LOCK TABLE {schema}.events IN SHARE ROW EXCLUSIVE MODE"))
    runtime = _runtime(make_app, tmp_path, lock_timeout_s=0.3, lock_retries=6)
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(run_maintenance(runtime, metadata=md)))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(
                    text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
                ).scalar():
                    break
            time.sleep(0.02)
        second = run_maintenance(runtime, metadata=md)
    finally:
        time.sleep(0.5)
        blocker.rollback()
        blocker.close()
        thread.join(60)
    assert second.status == "skipped" and "advisory lock" in (second.reason or "")
    assert second.actions == []
    assert first[0].status == "ok", first[0].errors
    create = next(a for a in first[0].actions if a.kind == "create")
    assert create.status == "done" and create.attempts >= 2  # waited out the lock, retried
    assert _index(engine, schema, "ix_events_account_created")["indisvalid"]  # type: ignore[index]
    assert sorted(r["status"] for r in recent_runs(runtime)) == ["ok", "skipped"]


def test_statement_timeout_and_unreachable_are_recorded_failed(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_account_created",), rows=ROWS)
    runtime = _runtime(make_app, tmp_path, statement_timeout_s=0.05)
    report = run_maintenance(runtime, metadata=md)
    assert report.status == "failed"
    assert "statement timeout" in report.errors[0]
    # The cancelled concurrent build left no invalid index behind.
    assert _index(engine, schema, "ix_events_account_created") is None
    fixed = run_maintenance(_runtime(make_app, tmp_path), metadata=md)
    assert fixed.status == "ok", fixed.errors

    down = run_maintenance(
        runtime, metadata=md, url="postgresql+psycopg2://postgres@127.0.0.1:1/test"
    )
    assert down.status == "failed" and "database unreachable" in (down.reason or "")
    assert [r["status"] for r in recent_runs(runtime)] == ["failed", "ok", "failed"]


def test_bloated_index_reindexed_concurrently_when_enabled(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, rows=100_000)
    with engine.connect() as conn:
        # Most rows gone: the index keeps its pages (VACUUM frees them for reuse only).
        conn.execute(text(f"DELETE FROM {schema}.events WHERE id % 10 <> 0"))
        conn.execute(text(f"VACUUM {schema}.events"))

    def size() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(f"SELECT pg_relation_size('{schema}.ix_events_account_created')")
                ).scalar()
            )

    before = size()
    observed = run_maintenance(_runtime(make_app, tmp_path), metadata=md)
    bloat = {b["index"]: b["bloat_pct"] for b in observed.findings["bloat"]}
    assert bloat["ix_events_account_created"] > 50
    assert not [a for a in observed.actions if a.kind == "reindex"]  # reindex is off by default
    report = run_maintenance(
        _runtime(make_app, tmp_path, reindex=True, reindex_min_mb=0.1, reindex_bloat_pct=50),
        metadata=md,
    )
    assert report.status == "ok", report.errors
    reindexed = {a.target.split(".")[-1] for a in report.actions if a.kind == "reindex"}
    assert "ix_events_account_created" in reindexed
    assert all(
        a.statement.startswith("REINDEX INDEX CONCURRENTLY")
        for a in report.actions
        if a.kind == "reindex"
    )
    assert size() < before / 3
    assert _index(engine, schema, "ix_events_account_created")["indisvalid"]  # type: ignore[index]


def test_failed_create_never_drops_an_existing_index_of_that_name(
    pg: tuple[Engine, str], make_app: Any, tmp_path: Path
) -> None:
    engine, schema = pg
    md = _events(schema)
    _create(engine, md, drop=("ix_events_account_created",), rows=100)
    with engine.connect() as conn:
        # The name is taken by an index of another table (index names are per schema).
        conn.execute(text(f"CREATE TABLE {schema}.other (x int)"))
        conn.execute(text(f"CREATE INDEX ix_events_account_created ON {schema}.other (x)"))
    report = run_maintenance(_runtime(make_app, tmp_path, lock_retries=0), metadata=md)
    assert report.status == "failed" and "already exists" in report.errors[0]
    kept = _index(engine, schema, "ix_events_account_created")
    assert kept is not None and "other" in kept["definition"]
