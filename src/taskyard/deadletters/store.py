"""The one dead-letter store: its interface, and the Redis store every worker writes to.

Entries are bounded by count and age (``TASKYARD_DEAD_LETTERS__MAX_ENTRIES``,
``__RETENTION_S``): every record applies both bounds, and the stats collection applies them
again so an idle store ages out too. An in-memory twin (:mod:`taskyard.deadletters.memory`)
has the same behaviour for fast unit tests.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import redis

from taskyard.deadletters.entry import DeadLetter, Query
from taskyard.keys import Keys
from taskyard.lua import Script
from taskyard.serialization import text

#: Separator of the parts of a gauge field ("<queue>\x1f<name>\x1f<reason>").
SEP = "\x1f"
_PAGE = 500


def _script(name: str) -> Script:
    return Script.from_files("taskyard.deadletters", "prelude.lua", f"{name}.lua")


# The store's writes, each one atomic script beside this module (the file says what is atomic).
RECORD = _script("record")
MARK_REPLAYED = _script("mark_replayed")
DELETE = _script("delete")
TRIM = _script("trim")


class DeadLetterStore(ABC):
    """Record, find, mark and delete dead-letter entries."""

    def __init__(self, max_entries: int, retention_s: float) -> None:
        self.max_entries = max_entries
        self.retention_s = retention_s

    @abstractmethod
    def record(self, entry: DeadLetter) -> None:
        """Store ``entry``; an earlier entry of its id is merged (first time kept, times + 1)."""

    @abstractmethod
    def get(self, entry_id: str) -> DeadLetter | None:
        """The entry with ``entry_id``, or None."""

    @abstractmethod
    def _ids(self, query: Query) -> Iterator[str]:
        """Ids that may match ``query`` (a superset is fine), newest death first."""

    @abstractmethod
    def _get_many(self, ids: list[str]) -> list[DeadLetter | None]:
        """The entries of ``ids`` in order (None for a missing one)."""

    @abstractmethod
    def mark_replayed(self, entry_id: str, new_id: str, at: float | None = None) -> bool:
        """Mark a dead entry replayed as task ``new_id``; False when it is not (any more) dead."""

    @abstractmethod
    def delete(self, ids: list[str]) -> int:
        """Delete entries by id; returns how many existed."""

    @abstractmethod
    def trim(self, now: float | None = None) -> int:
        """Apply the count and age bounds; returns how many entries were dropped."""

    @abstractmethod
    def counts(self) -> dict[tuple[str, str, str], int]:
        """Entries in state "dead" per (queue, name, reason): the gauge."""

    def cutoff(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.retention_s

    def iter(self, query: Query | None = None) -> Iterator[DeadLetter]:
        """Every entry matching ``query``, newest death first (read in pages)."""
        query = query or Query()
        page: list[str] = []
        for entry_id in self._ids(query):
            page.append(entry_id)
            if len(page) >= _PAGE:
                yield from self._matching(page, query)
                page = []
        if page:
            yield from self._matching(page, query)

    def _matching(self, ids: list[str], query: Query) -> Iterator[DeadLetter]:
        for entry in self._get_many(ids):
            if entry is not None and query.matches(entry):
                yield entry

    def search(
        self, query: Query | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[DeadLetter]:
        """Entries matching ``query``, newest death first, ``offset`` skipped, ``limit`` kept."""
        out: list[DeadLetter] = []
        for n, entry in enumerate(self.iter(query)):
            if n < offset:
                continue
            if len(out) >= limit:
                break
            out.append(entry)
        return out

    def count(self, query: Query | None = None) -> int:
        """How many entries match ``query``."""
        return sum(1 for _ in self.iter(query))

    def purge(self, query: Query | None = None) -> int:
        """Delete every entry matching ``query``; returns how many."""
        total = 0
        page: list[str] = []
        for entry in self.iter(query):
            page.append(entry.id)
            if len(page) >= _PAGE:
                total += self.delete(page)
                page = []
        if page:
            total += self.delete(page)
        return total


class RedisDeadLetterStore(DeadLetterStore):
    """The store in Redis: a hash of JSON entries, sorted-set indexes, a gauge hash."""

    def __init__(
        self, client: redis.Redis, keys: Keys, *, max_entries: int, retention_s: float
    ) -> None:
        super().__init__(max_entries, retention_s)
        self.client = client
        self.keys = keys
        self.prefix = keys.dead_prefix()

    @classmethod
    def for_runtime(cls, runtime: Any) -> RedisDeadLetterStore:
        """The store of an app's runtime (its Redis, namespace and bounds)."""
        settings = runtime.settings.dead_letters
        return cls(
            runtime.redis,
            runtime.keys,
            max_entries=settings.max_entries,
            retention_s=settings.retention_s,
        )

    def record(self, entry: DeadLetter) -> None:
        RECORD(
            self.client,
            (self.keys.dead_entries(),),
            (self.prefix, entry.id, entry.to_json(), self.max_entries, self.cutoff()),
        )

    def get(self, entry_id: str) -> DeadLetter | None:
        raw = self.client.hget(self.keys.dead_entries(), entry_id)
        return None if raw is None else DeadLetter.from_json(raw)

    def _get_many(self, ids: list[str]) -> list[DeadLetter | None]:
        raws = self.client.hmget(self.keys.dead_entries(), ids)
        return [None if raw is None else DeadLetter.from_json(raw) for raw in raws]

    def _ids(self, query: Query) -> Iterator[str]:
        exact = query.exact()
        # One index narrows the scan (the most selective first); matches() checks the rest.
        key = self.keys.dead_index()
        for name in ("name", "exception_type", "queue", "reason", "state"):
            if name in exact:
                key = self.keys.dead_by(name, exact[name])
                break
        high: Any = "+inf" if query.until is None else query.until
        low: Any = "-inf" if query.since is None else query.since
        start = 0
        while True:
            ids = self.client.zrevrangebyscore(key, high, low, start=start, num=_PAGE)
            yield from (text(i) for i in ids)
            if len(ids) < _PAGE:
                return
            start += _PAGE

    def count(self, query: Query | None = None) -> int:
        query = query or Query()
        exact = query.exact()
        if len(exact) <= 1:
            # One index holds exactly the matching ids: count them without reading entries.
            key = self.keys.dead_by(*next(iter(exact.items()))) if exact else self.keys.dead_index()
            low: Any = "-inf" if query.since is None else query.since
            high: Any = "+inf" if query.until is None else query.until
            return int(self.client.zcount(key, low, high))
        return super().count(query)

    def mark_replayed(self, entry_id: str, new_id: str, at: float | None = None) -> bool:
        return bool(
            MARK_REPLAYED(
                self.client,
                (self.keys.dead_entries(),),
                (self.prefix, entry_id, new_id, time.time() if at is None else at),
            )
        )

    def delete(self, ids: list[str]) -> int:
        if not ids:
            return 0
        return int(DELETE(self.client, (self.keys.dead_entries(),), (self.prefix, *ids)))

    def trim(self, now: float | None = None) -> int:
        return int(
            TRIM(
                self.client,
                (self.keys.dead_entries(),),
                (self.prefix, self.max_entries, self.cutoff(now)),
            )
        )

    def counts(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for field, value in self.client.hgetall(self.keys.dead_counts()).items():
            queue, name, reason = [*text(field).split(SEP), "", "", ""][:3]
            if int(value) > 0:
                out[(queue, name, reason)] = int(value)
        return out
