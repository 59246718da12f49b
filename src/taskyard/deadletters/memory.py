"""An in-memory dead-letter store with the Redis store's behaviour, for fast unit tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

from taskyard.deadletters.entry import DeadLetter, Query
from taskyard.deadletters.store import DeadLetterStore


class MemoryDeadLetterStore(DeadLetterStore):
    """Entries in a dict of one process; the same merge, bounds and ordering as Redis."""

    def __init__(self, *, max_entries: int = 10_000, retention_s: float = 7 * 86_400.0) -> None:
        super().__init__(max_entries, retention_s)
        self._entries: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

    def record(self, entry: DeadLetter) -> None:
        with self._lock:
            old = self._entries.get(entry.id)
            entry = replace(entry)
            if old is not None:
                entry.first_at = min(old.first_at, entry.first_at)
                entry.times = old.times + 1
            self._entries[entry.id] = entry
            self._trim(time.time())

    def get(self, entry_id: str) -> DeadLetter | None:
        with self._lock:
            entry = self._entries.get(entry_id)
            return None if entry is None else replace(entry)

    def _ids(self, query: Query) -> Iterator[str]:
        with self._lock:
            ordered = sorted(self._entries.values(), key=lambda e: e.last_at, reverse=True)
        return iter([e.id for e in ordered])

    def _get_many(self, ids: list[str]) -> list[DeadLetter | None]:
        return [self.get(i) for i in ids]

    def mark_replayed(self, entry_id: str, new_id: str, at: float | None = None) -> bool:
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None or entry.state != "dead":
                return False
            entry.state = "replayed"
            entry.replayed_as = new_id
            entry.replayed_at = time.time() if at is None else at
            return True

    def delete(self, ids: list[str]) -> int:
        with self._lock:
            return sum(1 for i in ids if self._entries.pop(i, None) is not None)

    def trim(self, now: float | None = None) -> int:
        with self._lock:
            return self._trim(time.time() if now is None else now)

    def _trim(self, now: float) -> int:
        cutoff = self.cutoff(now)
        gone = [i for i, e in self._entries.items() if e.last_at < cutoff]
        for entry_id in gone:
            del self._entries[entry_id]
        excess = len(self._entries) - self.max_entries
        if excess > 0:
            oldest = sorted(self._entries.values(), key=lambda e: e.last_at)[:excess]
            for entry in oldest:
                del self._entries[entry.id]
            return len(gone) + len(oldest)
        return len(gone)

    def counts(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(
                Counter(
                    (e.queue, e.name, e.reason) for e in self._entries.values() if e.state == "dead"
                )
            )
