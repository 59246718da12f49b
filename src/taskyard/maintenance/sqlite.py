"""Index maintenance of a SQLite database (the embedded default).

SQLite has no concurrent builds and no invalid indexes: missing declared indexes are created,
then ``ANALYZE``, ``PRAGMA optimize`` and ``PRAGMA quick_check`` run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import Connection, MetaData, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
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


class SqliteMaintenance:
    """One maintenance run on one SQLite database."""

    def __init__(
        self,
        url: str,
        metadata: MetaData,
        settings: MaintenanceSettings,
        report: RunReport,
        *,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.metadata = metadata
        self.settings = settings
        self.report = report
        self.echo = echo or (lambda _line: None)

    def run(self) -> None:
        # busy_timeout: wait this long for a writer instead of failing at once (lock_timeout).
        engine = create_engine(
            self.url, poolclass=NullPool, connect_args={"timeout": self.settings.lock_timeout_s}
        )
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                self._steps(conn)
        except SQLAlchemyError as exc:
            self.report.fail(f"database error: {getattr(exc, 'orig', exc)!s}")
        finally:
            engine.dispose()

    def _steps(self, conn: Connection) -> None:
        tables = {
            name
            for (name,) in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'table'")
            ).all()
        }
        missing_tables = [t.name for t in self.metadata.sorted_tables if t.name not in tables]
        if missing_tables:
            self.report.findings["missing_tables"] = missing_tables
        existing = {
            name
            for (name,) in conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'index'")
            ).all()
        }
        for table, index in declared_indexes(self.metadata):
            if table.name in tables and index.name not in existing:
                self._execute(
                    conn, "create", str(index.name), create_statement(index, conn.dialect)
                )
        for table in self.metadata.sorted_tables:
            if table.name in tables:
                self._execute(conn, "analyze", table.name, f'ANALYZE "{table.name}"')
        self._execute(conn, "optimize", "database", "PRAGMA optimize")
        check = self._execute(conn, "check", "database", "PRAGMA quick_check")
        if check is not None:
            problems = [row for row in check if row != "ok"]
            self.report.findings["quick_check"] = problems or ["ok"]
            if problems:
                self.report.fail(f"quick_check found {len(problems)} problem(s): {problems[0]}")
        infos = self._indexes(
            conn, [t.name for t in self.metadata.sorted_tables if t.name in tables]
        )
        self.report.findings["duplicates"] = duplicates(infos)
        self.report.findings["redundant"] = redundant(infos)

    def _execute(
        self, conn: Connection, kind: str, target: str, statement: str
    ) -> list[str] | None:
        action = Action(kind, target, statement)
        self.report.actions.append(action)
        self.echo(statement + ";")
        if self.report.dry_run:
            return None
        started = time.perf_counter()
        action.attempts = 1
        try:
            rows = conn.execute(text(statement))
            result = [str(r[0]) for r in rows.all()] if rows.returns_rows else []
            action.status = "done"
            return result
        except SQLAlchemyError as exc:
            action.status = "failed"
            action.error = str(getattr(exc, "orig", exc))
            self.report.fail(f"{kind} {target}: {action.error}")
            return None
        finally:
            action.duration_s = round(time.perf_counter() - started, 6)

    def _indexes(self, conn: Connection, tables: list[str]) -> list[ExistingIndex]:
        found = []
        for table in tables:
            for row in conn.execute(text(f'PRAGMA index_list("{table}")')).mappings().all():
                name = row["name"]
                columns = tuple(
                    str(c["name"] or "")
                    for c in conn.execute(text(f'PRAGMA index_info("{name}")')).mappings().all()
                )
                sql = conn.execute(
                    text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": name}
                ).scalar()
                predicate = sql.split(" WHERE ", 1)[1] if sql and " WHERE " in sql else None
                found.append(
                    ExistingIndex(
                        table,
                        name,
                        columns,
                        predicate,
                        bool(row["unique"]),
                        row["origin"] in ("u", "pk"),
                    )
                )
        return found
