"""Hypothesis stateful test of the batch buffer against real Redis.

Random interleavings of appends (single and bulk, two groups, under a max_buffered limit),
age flushes, deliveries of the flush messages (success, partial failure, whole failure, crash),
lease expiry and republishing, dead letters and requeue. After every step: no item lost or held
twice, no batch over batch_size, the pending count exact. At the end everything is drained and
every accepted item was delivered at least once and finished exactly once (processed or dead).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from taskyard.batching.buffer import BatchBuffer, Claimed
from taskyard.keys import Keys
from tests import servers

BATCH_SIZE = 5
LIMIT = 40
MAX_RETRIES = 1
NAME = "prop"


class BufferMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client = redis.Redis.from_url(servers.REDIS_URL)
        self.client.flushdb()
        self.keys = Keys("prop")
        self.buffer = BatchBuffer(self.client, self.keys, NAME)
        self.next_item = 0
        self.accepted: set[int] = set()
        self.processed: Counter[int] = Counter()  # finished successfully (may be > 1 after crash)
        self.delivered: Counter[int] = Counter()
        self.messages: list[str] = []  # flush messages "published", in any order
        self.tokens = 0

    # --- producers ----------------------------------------------------------------------------
    def _append(self, group: str, count: int, bulk: bool) -> None:
        items = list(range(self.next_item, self.next_item + count))
        self.next_item += count
        entries = [json.dumps({"i": i, "g": group}) for i in items]
        pending_before = self._pending()
        if bulk:
            results = self.buffer.append_many(
                [(group, entries)], batch_size=BATCH_SIZE, max_buffered=LIMIT, lease_ms=60_000
            )
            [result] = results
        else:
            result = self.buffer.append(
                group, entries, batch_size=BATCH_SIZE, max_buffered=LIMIT, lease_ms=60_000
            )
        if result.accepted:
            assert pending_before + count <= LIMIT
            self.accepted.update(items)
            self._publish(result.claimed)
        else:
            assert pending_before + count > LIMIT  # refused only when over the limit

    @rule(group=st.sampled_from(["a", "b"]), count=st.integers(1, 12), bulk=st.booleans())
    def append(self, group: str, count: int, bulk: bool) -> None:
        self._append(group, count, bulk)

    def _publish(self, claims: list[Claimed]) -> None:
        self.messages.extend(c.batch_id for c in claims)

    # --- reaper -------------------------------------------------------------------------------
    @rule()
    def age_flush(self) -> None:
        claimed, republished = self.buffer.reap(
            max_wait_ms=0, batch_size=BATCH_SIZE, lease_ms=60_000
        )
        self._publish(claimed)
        self._publish(republished)

    @rule()
    def leases_run_out(self) -> None:
        time.sleep(0.003)  # crashed holders took 1 ms leases
        claimed, republished = self.buffer.reap(
            max_wait_ms=10**9, batch_size=BATCH_SIZE, lease_ms=1
        )
        assert not claimed
        self._publish(republished)

    # --- workers ------------------------------------------------------------------------------
    @precondition(lambda self: self.messages)
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "ok", "partial", "fail", "crash"]))
    def deliver(self, data: st.DataObject, outcome: str) -> None:
        index = data.draw(st.integers(0, len(self.messages) - 1))
        batch_id = self.messages.pop(index)
        self.tokens += 1
        token = f"t{self.tokens}"
        lease = 1 if outcome == "crash" else 60_000
        got = self.buffer.acquire(batch_id, token, lease)
        if got.status != "ok":
            return  # a stale duplicate message: finished, dead, or held
        items = [json.loads(e)["i"] for e in got.entries]
        assert 1 <= len(items) <= BATCH_SIZE
        groups = {json.loads(e)["g"] for e in got.entries}
        assert groups == {got.group}  # a batch never mixes keys
        self.delivered.update(items)
        if outcome == "ok":
            if self.buffer.complete(batch_id) >= 0:
                self.processed.update(items)
        elif outcome == "crash":
            return  # the lease runs out; the reaper republishes it
        else:
            failed = (
                None
                if outcome == "fail"
                else sorted(set(data.draw(st.lists(st.integers(0, len(items) - 1)))))
            )
            result = self.buffer.fail(
                batch_id,
                token,
                max_retries=MAX_RETRIES,
                backoff_ms=0,
                lease_ms=60_000,
                error="boom",
                failed=failed,
            )
            if failed is not None:
                self.processed.update(item for k, item in enumerate(items) if k not in failed)
            if result.status == "retry":
                self.messages.append(batch_id)  # Celery's retry message

    @precondition(lambda self: self.buffer.dead_ids())
    @rule()
    def requeue_dead(self) -> None:
        for batch_id in self.buffer.dead_ids():
            claim = self.buffer.requeue(batch_id, 60_000)
            assert claim is not None
            self._publish([claim])

    # --- invariants ---------------------------------------------------------------------------
    def _pending(self) -> int:
        return int(self.client.get(self.keys.batch_pending(NAME)) or 0)

    def _held(self) -> Counter[int]:
        """Every item Redis holds: buffered, in flight or dead."""
        held: Counter[int] = Counter()
        for group in ("a", "b"):
            for raw in self.client.lrange(self.keys.batch_buffer(NAME, group), 0, -1):
                held[json.loads(raw)["i"]] += 1
        batch_ids = [x.decode() for x in self.client.zrange(self.keys.batch_leases(NAME), 0, -1)]
        dead_ids = self.buffer.dead_ids()
        for batch_id in batch_ids + dead_ids:
            for raw in self.client.lrange(self.keys.batch_items(NAME, batch_id), 0, -1):
                held[json.loads(raw)["i"]] += 1
        return held

    @invariant()
    def nothing_lost_nothing_twice(self) -> None:
        held = self._held()
        assert max(held.values(), default=1) == 1
        finished = set(self.processed)
        assert set(held) | finished == self.accepted
        assert not set(held) & finished
        dead_items = sum(
            len(self.client.lrange(self.keys.batch_items(NAME, b), 0, -1))
            for b in self.buffer.dead_ids()
        )
        assert self._pending() == sum(held.values()) - dead_items

    @invariant()
    def buffers_stay_below_batch_size(self) -> None:
        for group in ("a", "b"):
            assert self.client.llen(self.keys.batch_buffer(NAME, group)) < BATCH_SIZE

    def teardown(self) -> None:
        try:
            self._drain()
            assert set(self.processed) == self.accepted
            assert all(self.delivered[i] >= 1 for i in self.accepted)
            assert self._pending() == 0
        finally:
            self.client.flushdb()
            self.client.close()

    def _drain(self) -> None:
        self.buffer.reap(max_wait_ms=0, batch_size=BATCH_SIZE, lease_ms=1)
        for _ in range(50):
            for batch_id in self.buffer.dead_ids():
                self.buffer.requeue(batch_id, 1)
            time.sleep(0.003)
            self.buffer.reap(max_wait_ms=0, batch_size=BATCH_SIZE, lease_ms=1)
            ids = [x.decode() for x in self.client.zrange(self.keys.batch_leases(NAME), 0, -1)]
            if not ids:
                return
            for batch_id in ids:
                got = self.buffer.acquire(batch_id, f"drain-{batch_id}", 60_000)
                if got.status == "ok":
                    items = [json.loads(e)["i"] for e in got.entries]
                    self.delivered.update(items)
                    if self.buffer.complete(batch_id) >= 0:
                        self.processed.update(items)
        raise AssertionError("batches still in flight after draining")


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(autouse=True)
def _redis_available() -> None:
    servers.require("redis")
