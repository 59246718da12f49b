"""Stateful property test: the Redis dead-letter store and its in-memory twin stay alike under
any sequence of records, replays, deletes, purges and trims, and the Redis store's indexes and
gauge counts always agree with its entries (nothing listed that is gone, nothing unlisted)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from taskyard.deadletters import DeadLetter, MemoryDeadLetterStore, Query, RedisDeadLetterStore
from taskyard.deadletters.entry import INDEXED
from taskyard.keys import Keys
from tests import servers

IDS = st.sampled_from([f"id{i}" for i in range(12)])
NAMES = st.sampled_from(["a.t", "b.t", "c.t"])
QUEUES = st.sampled_from(["high", "low"])
REASONS = st.sampled_from(["failed", "crashed", "poison", "expired"])
EXCEPTIONS = st.sampled_from(["ValueError", "KeyError", ""])
MAX_ENTRIES = 8
#: Far beyond a suite run, so only trim_late ages entries out.
RETENTION_S = 30 * 86_400.0
BASE = round(time.time(), 3)


class StoreMachine(RuleBasedStateMachine):
    """Every rule runs on both stores; the invariants compare them."""

    @initialize()
    def setup(self) -> None:
        self.client = redis.Redis.from_url(servers.REDIS_URL)
        self.client.flushdb()
        self.keys = Keys("prop")
        self.redis = RedisDeadLetterStore(
            self.client, self.keys, max_entries=MAX_ENTRIES, retention_s=RETENTION_S
        )
        self.memory = MemoryDeadLetterStore(max_entries=MAX_ENTRIES, retention_s=RETENTION_S)
        self.clock = 0

    def _both(self, call: str, *args: Any) -> tuple[Any, Any]:
        return getattr(self.redis, call)(*args), getattr(self.memory, call)(*args)

    @rule(entry_id=IDS, name=NAMES, queue=QUEUES, reason=REASONS, exc=EXCEPTIONS)
    def record(self, entry_id: str, name: str, queue: str, reason: str, exc: str) -> None:
        # Distinct, increasing death times (ms apart) keep the order well defined.
        self.clock += 1
        entry = DeadLetter(
            id=entry_id,
            name=name,
            queue=queue,
            reason=reason,
            exception_type=exc,
            last_at=BASE + self.clock / 1000,
        )
        self._both("record", entry)

    @rule(entry_id=IDS)
    def mark_replayed(self, entry_id: str) -> None:
        got_redis, got_memory = self._both("mark_replayed", entry_id, f"new-{entry_id}", BASE)
        assert got_redis == got_memory

    @rule(ids=st.lists(IDS, max_size=3))
    def delete(self, ids: list[str]) -> None:
        got_redis, got_memory = self._both("delete", ids)
        assert got_redis == got_memory

    @rule(name=st.none() | NAMES, reason=st.none() | REASONS)
    def purge(self, name: str | None, reason: str | None) -> None:
        got_redis, got_memory = self._both("purge", Query(name=name, reason=reason))
        assert got_redis == got_memory

    @rule()
    def trim_late(self) -> None:
        # Far enough ahead that every entry is older than the retention.
        got_redis, got_memory = self._both("trim", BASE + RETENTION_S + 3600)
        assert got_redis == got_memory

    @invariant()
    def alike(self) -> None:
        if not hasattr(self, "redis"):
            return
        for query in (
            Query(state=None),
            Query(),
            Query(state="replayed"),
            Query(name="a.t"),
            Query(queue="low", reason="failed"),
            Query(exception_type="KeyError"),
        ):
            in_redis = [(e.id, e.state, e.times) for e in self.redis.search(query, limit=100)]
            in_memory = [(e.id, e.state, e.times) for e in self.memory.search(query, limit=100)]
            assert in_redis == in_memory, query
            assert self.redis.count(query) == len(in_redis)
        assert self.redis.counts() == self.memory.counts()
        assert self.redis.count(Query(state=None)) <= MAX_ENTRIES

    @invariant()
    def indexes_agree_with_entries(self) -> None:
        if not hasattr(self, "redis"):
            return
        entries = {e.id: e for e in self.redis.search(Query(state=None), limit=100)}
        stored = {k.decode() for k in self.client.hkeys(self.keys.dead_entries())}
        assert stored == set(entries)
        assert {m.decode() for m in self.client.zrange(self.keys.dead_index(), 0, -1)} == stored
        for key in self.client.scan_iter(f"{self.keys.dead_prefix()}by:*"):
            field, _, value = (
                key.decode().removeprefix(f"{self.keys.dead_prefix()}by:").partition(":")
            )
            assert field in INDEXED
            for member in self.client.zrange(key, 0, -1):
                assert str(getattr(entries[member.decode()], field)) == value


@pytest.fixture(autouse=True)
def _redis(redis_client: redis.Redis) -> None:
    """The suite's database, flushed around the test."""


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
