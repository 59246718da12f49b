"""Declared indexes (from SQLAlchemy metadata) and checks shared by the database backends."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Index, MetaData, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex


@dataclass(frozen=True)
class ExistingIndex:
    """An index found in the database catalog."""

    table: str
    name: str
    columns: tuple[str, ...]  # column names in order; "" for an expression
    predicate: str | None  # WHERE clause of a partial index
    unique: bool
    backs_constraint: bool = False  # primary key or unique constraint: never reported unused
    method: str = "btree"
    opclasses: str = ""


def declared_indexes(metadata: MetaData) -> list[tuple[Table, Index]]:
    """Every (table, index) the metadata declares, tables in dependency order."""
    found = []
    for table in metadata.sorted_tables:
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            found.append((table, index))
    return found


def create_statement(index: Index, dialect: Dialect, *, concurrently: bool = False) -> str:
    """CREATE INDEX for a declared index, in the dialect (WHERE clause of partial ones kept)."""
    sql = str(CreateIndex(index).compile(dialect=dialect)).strip()
    if concurrently and " CONCURRENTLY " not in sql:
        sql = re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", sql)
    return sql


def duplicates(indexes: list[ExistingIndex]) -> list[dict[str, Any]]:
    """Groups of indexes of one table with the same columns, method and predicate."""
    groups: dict[tuple[Any, ...], list[ExistingIndex]] = defaultdict(list)
    for ix in indexes:
        groups[(ix.table, ix.columns, ix.predicate, ix.method, ix.opclasses)].append(ix)
    return [
        {"table": key[0], "columns": list(key[1]), "indexes": sorted(i.name for i in group)}
        for key, group in groups.items()
        if len(group) > 1
    ]


def redundant(indexes: list[ExistingIndex]) -> list[dict[str, Any]]:
    """Non-unique btree indexes whose columns are a strict leading prefix of another's."""
    found = []
    by_table: dict[str, list[ExistingIndex]] = defaultdict(list)
    for ix in indexes:
        by_table[ix.table].append(ix)
    for table, group in by_table.items():
        for short in group:
            if short.unique or short.method != "btree" or "" in short.columns:
                continue
            for long in group:
                if (
                    long is not short
                    and long.method == "btree"
                    and long.predicate == short.predicate
                    and len(long.columns) > len(short.columns)
                    and long.columns[: len(short.columns)] == short.columns
                ):
                    found.append(
                        {
                            "table": table,
                            "index": short.name,
                            "covered_by": long.name,
                            "columns": list(short.columns),
                        }
                    )
                    break
    return found
