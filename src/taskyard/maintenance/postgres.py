"""Index maintenance of a PostgreSQL database.

Every DDL statement runs on an autocommit connection (``CREATE INDEX CONCURRENTLY`` cannot run
in a transaction) under ``lock_timeout``; a statement that times out waiting for a lock is
retried with a growing pause. A session advisory lock keeps one run at a time cluster-wide.
Invalid indexes (left by failed concurrent builds) are rebuilt, except on a table where an index
build is in progress (``pg_stat_progress_create_index``): that invalid index may be the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, MetaData, Table, create_engine, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from taskyard.config import MaintenanceSettings
from taskyard.maintenance.indexes import (
    ExistingIndex,
    create_statement,
    declared_indexes,
    duplicates,
    redundant,
)
from taskyard.maintenance.report import Action, RunReport

log = logging.getLogger(__name__)

LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
#: Leftovers of a failed REINDEX CONCURRENTLY: dropped, never rebuilt.
_LEFTOVER = re.compile(r"_cc(new|old)\d*$")
#: Indexes smaller than this many pages are all overhead; their bloat estimate means nothing.
_MIN_PAGES_FOR_BLOAT = 8

_CATALOG = text("""
SELECT t.oid AS table_oid, t.relname AS table_name, n.nspname AS schema_name,
       i.oid AS index_oid, i.relname AS index_name, x.indisvalid, x.indisready, x.indislive,
       x.indisunique, x.indisprimary, am.amname, x.indclass::text AS opclasses,
       pg_get_expr(x.indpred, x.indrelid) AS predicate,
       ARRAY(SELECT coalesce(a.attname, '')
             FROM unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
             ORDER BY k.ord) AS columns,
       EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid) AS backs_constraint,
       pg_relation_size(x.indexrelid) AS bytes, i.relpages, t.reltuples,
       coalesce(s.idx_scan, 0) AS scans
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
JOIN pg_am am ON am.oid = i.relam
LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = x.indexrelid
WHERE x.indrelid = ANY(:oids)
ORDER BY t.relname, i.relname
""")

_STATS_AGE = text("""
SELECT extract(epoch FROM now() - coalesce(
    (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()),
    pg_postmaster_start_time()))
""")


def advisory_key(namespace: str) -> int:
    """The advisory lock id of a deployment's maintenance (a stable signed 64-bit number)."""
    digest = hashlib.sha256(f"taskyard:maintenance:{namespace}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresMaintenance:
    """One maintenance run on one PostgreSQL database."""

    def __init__(
        self,
        url: str,
        metadata: MetaData,
        settings: MaintenanceSettings,
        report: RunReport,
        *,
        namespace: str = "taskyard",
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.metadata = metadata
        self.settings = settings
        self.report = report
        self.namespace = namespace
        self.echo = echo or (lambda _line: None)

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> None:
        engine = create_engine(self.url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        try:
            try:
                conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except SQLAlchemyError as exc:
                self.report.fail(f"database unreachable: {_reason(exc)}")
                return
            with conn:
                timeout_ms = int(self.settings.statement_timeout_s * 1000)
                conn.execute(text(f"SET statement_timeout = {timeout_ms}"))
                key = advisory_key(self.namespace)
                if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                    self.report.status = "skipped"
                    self.report.reason = "another maintenance run holds the advisory lock"
                    return
                try:
                    self._steps(conn)
                except SQLAlchemyError as exc:
                    self.report.fail(f"maintenance aborted: {_reason(exc)}")
                finally:
                    # If the connection is gone, its session lock went with it.
                    with contextlib.suppress(SQLAlchemyError):
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()

    def _steps(self, conn: Connection) -> None:
        tables = self._existing_tables(conn)
        building = self._tables_building(conn)
        existing = self._catalog(conn, list(tables.values()))
        by_name = {(row["table_oid"], row["index_name"]): row for row in existing}
        declared_names: set[tuple[int, str]] = set()

        for table, index in declared_indexes(self.metadata):
            oid = tables.get(table.key)
            if oid is None:
                continue
            declared_names.add((oid, str(index.name)))
            target = self._qualified(conn, table, str(index.name))
            create = create_statement(index, conn.dialect, concurrently=True)
            drop = f"DROP INDEX CONCURRENTLY IF EXISTS {target}"
            row = by_name.get((oid, str(index.name)))
            if oid in building and (row is None or not row["indisvalid"]):
                self._skip(
                    "create" if row is None else "rebuild",
                    target,
                    create,
                    "an index build is in progress on this table",
                )
            elif row is None:
                self._execute("create", target, create, cleanup=True)
            elif not row["indisvalid"]:
                if not row["indislive"]:
                    self._skip("rebuild", target, create, "index is being dropped")
                    continue
                self.echo(f"-- {target} is INVALID (a failed concurrent build): rebuilding")
                if self._execute("drop", target, drop):
                    self._execute("create", target, create, cleanup=True)

        for row in existing:
            if row["indisvalid"] or (row["table_oid"], row["index_name"]) in declared_names:
                continue
            target = f"{_quote(conn, row['schema_name'])}.{_quote(conn, row['index_name'])}"
            if row["table_oid"] in building or not row["indislive"]:
                self._skip(
                    "rebuild",
                    target,
                    f"REINDEX INDEX CONCURRENTLY {target}",
                    "an index build is in progress on this table",
                )
            elif _LEFTOVER.search(row["index_name"]):
                self._execute("drop", target, f"DROP INDEX CONCURRENTLY IF EXISTS {target}")
            else:
                self._execute("rebuild", target, f"REINDEX INDEX CONCURRENTLY {target}")

        for table in self.metadata.sorted_tables:
            if table.key in tables:
                target = self._qualified_table(conn, table)
                if tables[table.key] in building:
                    # ANALYZE would queue behind the build's lock (and block writers behind it).
                    self._skip(
                        "analyze",
                        target,
                        f"ANALYZE {target}",
                        "an index build is in progress on this table",
                    )
                else:
                    self._execute("analyze", target, f"ANALYZE {target}")

        self._findings(conn, list(tables.values()))

    # --- catalog ---------------------------------------------------------------------------
    def _existing_tables(self, conn: Connection) -> dict[str, int]:
        current = conn.execute(text("SELECT current_schema()")).scalar()
        found: dict[str, int] = {}
        missing = []
        for table in self.metadata.sorted_tables:
            oid = conn.execute(
                text(
                    "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :schema AND c.relname = :name AND c.relkind IN ('r', 'p')"
                ),
                {"schema": table.schema or current, "name": table.name},
            ).scalar()
            if oid is None:
                missing.append(table.fullname)
            else:
                found[table.key] = int(oid)
        if missing:
            self.report.findings["missing_tables"] = missing
        return found

    def _tables_building(self, conn: Connection) -> set[int]:
        rows = (
            conn.execute(
                text(
                    "SELECT relid, index_relid, command, phase FROM pg_stat_progress_create_index "
                    "WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
            )
            .mappings()
            .all()
        )
        if rows:
            self.report.findings["builds_in_progress"] = [dict(r) for r in rows]
        return {int(r["relid"]) for r in rows}

    def _catalog(self, conn: Connection, oids: list[int]) -> list[dict[str, Any]]:
        if not oids:
            return []
        return [dict(r) for r in conn.execute(_CATALOG, {"oids": oids}).mappings().all()]

    def _qualified_table(self, conn: Connection, table: Table) -> str:
        schema = table.schema or conn.execute(text("SELECT current_schema()")).scalar()
        return f"{_quote(conn, str(schema))}.{_quote(conn, table.name)}"

    def _qualified(self, conn: Connection, table: Table, name: str) -> str:
        schema = table.schema or conn.execute(text("SELECT current_schema()")).scalar()
        return f"{_quote(conn, str(schema))}.{_quote(conn, name)}"

    # --- statements ---------------------------------------------------------------------------
    def _skip(self, kind: str, target: str, statement: str, why: str) -> None:
        self.echo(f"-- skipped {target}: {why}")
        self.report.actions.append(Action(kind, target, statement, status="skipped", error=why))

    def _execute(self, kind: str, target: str, statement: str, *, cleanup: bool = False) -> bool:
        """Run one DDL statement with lock_timeout and retries; True when it succeeded."""
        action = Action(kind, target, statement)
        self.report.actions.append(action)
        self.echo(statement + ";")
        if self.report.dry_run:
            return True
        started = time.perf_counter()
        retries = self.settings.lock_retries
        lock_ms = int(self.settings.lock_timeout_s * 1000)
        # A dedicated connection per statement: a cancelled statement leaves nothing behind.
        engine = create_engine(self.url, poolclass=NullPool, connect_args={"connect_timeout": 10})
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                timeout_ms = int(self.settings.statement_timeout_s * 1000)
                conn.execute(text(f"SET statement_timeout = {timeout_ms}"))
                conn.execute(text(f"SET lock_timeout = {lock_ms}"))
                for attempt in range(1, retries + 2):
                    action.attempts = attempt
                    try:
                        conn.execute(text(statement))
                        action.status = "done"
                        return True
                    except DBAPIError as exc:
                        code = getattr(exc.orig, "pgcode", None)
                        if code == LOCK_NOT_AVAILABLE and attempt <= retries:
                            pause = min(30.0, self.settings.lock_timeout_s * 2 ** (attempt - 1))
                            log.warning(
                                "maintenance: %s waited too long for a lock (attempt %d),"
                                " retrying in %.1f s",
                                target,
                                attempt,
                                pause,
                            )
                            if cleanup:
                                _drop_if_invalid(conn, target)
                            time.sleep(pause)
                            continue
                        if cleanup:
                            _drop_if_invalid(conn, target)
                        what = (
                            "statement timeout"
                            if code == QUERY_CANCELED
                            else "lock timeout"
                            if code == LOCK_NOT_AVAILABLE
                            else "error"
                        )
                        action.status = "failed"
                        action.error = f"{what}: {_reason(exc)}"
                        self.report.fail(f"{kind} {target}: {action.error}")
                        return False
            return False
        except SQLAlchemyError as exc:
            action.status = "failed"
            action.error = _reason(exc)
            self.report.fail(f"{kind} {target}: {action.error}")
            return False
        finally:
            action.duration_s = round(time.perf_counter() - started, 6)
            engine.dispose()

    # --- findings ---------------------------------------------------------------------------
    def _findings(self, conn: Connection, oids: list[int]) -> None:
        rows = self._catalog(conn, oids)
        stats_age = conn.execute(_STATS_AGE).scalar()
        block = int(conn.execute(text("SELECT current_setting('block_size')")).scalar() or 8192)
        infos = [
            ExistingIndex(
                r["table_name"],
                r["index_name"],
                tuple(r["columns"]),
                r["predicate"],
                bool(r["indisunique"]),
                bool(r["backs_constraint"] or r["indisprimary"]),
                r["amname"],
                r["opclasses"],
            )
            for r in rows
            if r["indisvalid"]
        ]
        findings = self.report.findings
        findings["stats_age_s"] = round(float(stats_age or 0.0), 1)
        findings["unused"] = [
            {
                "table": r["table_name"],
                "index": r["index_name"],
                "scans": int(r["scans"]),
                "bytes": int(r["bytes"]),
            }
            for r in rows
            if r["indisvalid"]
            and int(r["scans"]) == 0
            and not (r["indisunique"] or r["indisprimary"] or r["backs_constraint"])
        ]
        findings["duplicates"] = duplicates(infos)
        findings["redundant"] = redundant(infos)
        findings["invalid"] = [r["index_name"] for r in rows if not r["indisvalid"]]
        widths = self._column_widths(conn, oids)
        bloat = []
        for r in rows:
            estimate = _bloat_pct(r, widths.get(int(r["table_oid"]), {}), block)
            if estimate is not None:
                bloat.append(
                    {
                        "table": r["table_name"],
                        "index": r["index_name"],
                        "bytes": int(r["bytes"]),
                        "bloat_pct": round(estimate, 1),
                        "schema": r["schema_name"],
                    }
                )
        findings["bloat"] = bloat
        if self.settings.reindex:
            min_bytes = self.settings.reindex_min_mb * 1024 * 1024
            for entry in bloat:
                if (
                    entry["bloat_pct"] > self.settings.reindex_bloat_pct
                    and entry["bytes"] >= min_bytes
                ):
                    target = f"{_quote(conn, entry['schema'])}.{_quote(conn, entry['index'])}"
                    self._execute("reindex", target, f"REINDEX INDEX CONCURRENTLY {target}")

    def _column_widths(self, conn: Connection, oids: list[int]) -> dict[int, dict[str, int]]:
        rows = conn.execute(
            text(
                "SELECT c.oid, s.attname, s.avg_width FROM pg_stats s "
                "JOIN pg_namespace n ON n.nspname = s.schemaname "
                "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename "
                "WHERE c.oid = ANY(:oids)"
            ),
            {"oids": oids},
        ).all()
        widths: dict[int, dict[str, int]] = {}
        for oid, name, width in rows:
            widths.setdefault(int(oid), {})[name] = int(width)
        return widths


def _bloat_pct(row: dict[str, Any], widths: dict[str, int], block: int) -> float | None:
    """Estimated share of a btree index that is empty space, from its size and row statistics.

    Expected size: each entry takes an 8-byte tuple header plus the columns' average widths,
    aligned to 8 bytes, plus a 4-byte line pointer; leaf pages are filled to 90 %.
    """
    pages = int(row["relpages"] or 0)
    tuples = float(row["reltuples"] or 0)
    columns = list(row["columns"])
    if (
        row["amname"] != "btree"
        or pages < _MIN_PAGES_FOR_BLOAT
        or tuples < 0
        or "" in columns
        or any(c not in widths for c in columns)
    ):
        return None
    entry = 8 * math.ceil((8 + sum(widths[c] for c in columns)) / 8) + 4
    per_page = max(1, int((block - 24 - 16) * 0.9 // entry))
    expected = math.ceil(tuples / per_page) + 1
    return max(0.0, (pages - expected) / pages * 100)


def _quote(conn: Connection, name: str) -> str:
    return str(conn.dialect.identifier_preparer.quote(name))


def _drop_if_invalid(conn: Connection, target: str) -> None:
    """Drop what a failed concurrent build left: ``target`` only if it exists and is INVALID.

    A build can also fail because an index of that name already exists; that one is kept.
    """
    try:
        invalid = conn.execute(
            text("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": target},
        ).scalar()
        if invalid:
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {target}"))
    except SQLAlchemyError as exc:
        log.warning("maintenance: leftover of the failed build of %s not dropped: %s", target, exc)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).strip().splitlines()
    return message[0] if message else type(exc).__name__
