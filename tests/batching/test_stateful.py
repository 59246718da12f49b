"""Hypothesis stateful test of the batch buffer against real Redis.

Random interleavings of appends (single and bulk, two groups, under a max_buffered limit),
age flushes, deliveries of the flush messages (success, partial failure, whole failure, crash, a
hung holder), lease expiry and republishing, dead letters and requeue. After every step: no item
lost or held twice, no batch over batch_size, the pending count exact, the dead letters those
the replies named. At the end everything is drained and every accepted item was delivered at
least once and finished exactly once (processed or dead).

Hypothesis replays a choice sequence and requires the same draws from it, so what the rules draw
and which rules are enabled depend on the model alone, and the model on the draws alone: never
on Redis contents or on how long steps took. Leases are what time could change, so each lease is
at every step either surely past (a crash's 1 ms lease, slept through; ``leases_run_out`` moves
every deadline into the past) or surely ahead (60 s).
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
#: Lease of a batch whose holder lives: never runs out by itself during a test (ms).
LEASE_MS = 60_000
#: Lease a crashing holder took, and how long the step then waits: past for sure afterwards.
CRASH_LEASE_MS, CRASH_WAIT_S = 1, 0.003


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
        self.dead: set[str] = set()  # ids of dead batches, as the replies said
        self.tokens = 0

    # --- producers ----------------------------------------------------------------------------
    def _append(self, group: str, count: int, bulk: bool) -> None:
        items = list(range(self.next_item, self.next_item + count))
        self.next_item += count
        entries = [json.dumps({"i": i, "g": group}) for i in items]
        pending_before = self._pending()
        if bulk:
            results = self.buffer.append_many(
                [(group, entries)], batch_size=BATCH_SIZE, max_buffered=LIMIT, lease_ms=LEASE_MS
            )
            [result] = results
        else:
            result = self.buffer.append(
                group, entries, batch_size=BATCH_SIZE, max_buffered=LIMIT, lease_ms=LEASE_MS
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
        # Also republishes the batches of crashed holders: their leases are past.
        claimed, republished = self.buffer.reap(
            max_wait_ms=0, batch_size=BATCH_SIZE, lease_ms=LEASE_MS
        )
        self._publish(claimed)
        self._publish(republished)

    @rule()
    def leases_run_out(self) -> None:
        # Time passes every deadline: queued batches (a backlog longer than the lease) and
        # retries are republished beside their messages, crashed ones taken back.
        self._run_out_every_lease()
        claimed, republished = self.buffer.reap(
            max_wait_ms=10**9, batch_size=BATCH_SIZE, lease_ms=LEASE_MS
        )
        assert not claimed
        self._publish(republished)

    def _run_out_every_lease(self) -> None:
        """Move every lease deadline into the past, as if the clock had passed them all.

        The scripts read Redis's clock (TIME), which cannot be moved; waiting for short leases
        instead would make which of them ran out depend on how long the steps took.
        """
        leases = self.keys.batch_leases(NAME)
        ids = self.client.zrange(leases, 0, -1)
        if ids:
            self.client.zadd(leases, dict.fromkeys(ids, 0), xx=True)

    # --- workers ------------------------------------------------------------------------------
    @precondition(lambda self: self.messages)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["ok", "ok", "partial", "fail", "crash", "hang"]),
        picks=st.lists(st.integers(0, BATCH_SIZE - 1), max_size=BATCH_SIZE),
    )
    def deliver(self, data: st.DataObject, outcome: str, picks: list[int]) -> None:
        index = data.draw(st.integers(0, len(self.messages) - 1))  # of the model's messages
        batch_id = self.messages.pop(index)
        self.tokens += 1
        token = f"t{self.tokens}"
        lease = CRASH_LEASE_MS if outcome == "crash" else LEASE_MS
        got = self.buffer.acquire(batch_id, token, lease)
        if outcome == "crash" and got.status == "ok":
            time.sleep(CRASH_WAIT_S)  # its lease is past at every later step
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
        elif outcome in ("crash", "hang"):
            # The holder died (its lease is past) or hangs (deliveries find the batch busy
            # until leases_run_out); either way the reaper republishes it.
            return
        else:
            # Drawn with the rule, not from the reply: the indices within this batch.
            failed = None if outcome == "fail" else sorted({k for k in picks if k < len(items)})
            result = self.buffer.fail(
                batch_id,
                token,
                max_retries=MAX_RETRIES,
                backoff_ms=0,
                lease_ms=LEASE_MS,
                error="boom",
                failed=failed,
            )
            if failed is not None:
                self.processed.update(item for k, item in enumerate(items) if k not in failed)
            if result.status == "retry":
                self.messages.append(batch_id)  # Celery's retry message
            elif result.status == "dead":
                self.dead.add(batch_id)

    @precondition(lambda self: self.dead)
    @rule()
    def requeue_dead(self) -> None:
        for batch_id in sorted(self.dead):
            claim = self.buffer.requeue(batch_id, LEASE_MS)
            assert claim is not None
            self._publish([claim])
        self.dead.clear()

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
    def dead_letters_as_the_replies_said(self) -> None:
        assert set(self.buffer.dead_ids()) == self.dead

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
        self._run_out_every_lease()  # hung holders too
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
