"""The Redis side of one batch name: append, claim, lease, finish, dead letters.

:class:`BatchBuffer` runs the Lua scripts beside this module (``append.lua``, ``reap.lua``, ...,
each after the shared ``prelude.lua``; each file says what it makes atomic) and turns their
replies into small typed results. It knows nothing of Celery: publishing the claimed batches is
the caller's job, so the buffer can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from taskyard import lua
from taskyard.errors import OUT_OF_MEMORY, BufferUnavailable, out_of_memory
from taskyard.keys import Keys
from taskyard.lua import Script
from taskyard.serialization import text


def _script(name: str) -> Script:
    return Script.from_files("taskyard.batching", "prelude.lua", f"{name}.lua")


APPEND = _script("append")
REAP = _script("reap")
ACQUIRE = _script("acquire")
RENEW = _script("renew")
COMPLETE = _script("complete")
FAIL = _script("fail")
REQUEUE = _script("requeue")
PURGE = _script("purge")
INSPECT = _script("inspect")
ALL_SCRIPTS = (APPEND, REAP, ACQUIRE, RENEW, COMPLETE, FAIL, REQUEUE, PURGE, INSPECT)


def run_pipeline(client: redis.Redis, build: Callable[[Any], None]) -> list[Any]:
    """Execute a pipeline of buffer script calls (see :func:`taskyard.lua.run_pipeline`)."""
    return lua.run_pipeline(client, ALL_SCRIPTS, build)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A batch that a script moved in flight: the caller publishes its flush task."""

    batch_id: str
    group: str
    size: int


@dataclass(slots=True)
class AppendResult:
    """Outcome of appending one chunk of items to a group's buffer."""

    accepted: bool
    pending: int
    claimed: list[Claimed] = field(default_factory=list)
    #: The batch's definition is missing from Redis: the caller registers it.
    unregistered: bool = False


@dataclass(frozen=True, slots=True)
class Acquired:
    """A batch taken for processing (status "ok"), or why it was not ("gone", "dead", "busy")."""

    status: str
    group: str = ""
    attempts: int = 0
    deliveries: int = 0
    duplicate: bool = False
    entries: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Failed:
    """Outcome of a failure report: "retry", "dead", "done" (nothing failed), "gone", "lost"."""

    status: str
    attempts: int
    failed: int


class BatchBuffer:
    """Buffers, batches and dead letters of one batch name in Redis."""

    def __init__(self, client: redis.Redis, keys: Keys, batch_name: str) -> None:
        self.client = client
        self.keys = keys
        self.batch_name = batch_name
        self.prefix = keys.batch_prefix(batch_name)

    # --- producers --------------------------------------------------------------------------
    def append(
        self,
        group: str,
        entries: Sequence[str],
        *,
        batch_size: int,
        max_buffered: int,
        lease_ms: int,
        register: Mapping[str, Any] | None = None,
    ) -> AppendResult:
        """Append encoded items to ``group``'s buffer in one round trip; claim full batches.

        ``register`` (the batch's definition) is written in the same round trip the first time
        a process uses the batch name.
        """
        args = (self.prefix, group, batch_size, max_buffered, lease_ms, *entries)
        key = self.keys.batch_buffer(self.batch_name, group)
        try:
            if register is None:
                return self._append_result(APPEND.fast(self.client, (key,), args))

            def build(pipe: Any) -> None:
                self._queue_register(pipe, register)
                APPEND.queue(pipe, (key,), args)

            return self._append_result(run_pipeline(self.client, build)[-1])
        except redis.exceptions.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            raise self._full(exc) from exc

    def append_many(
        self,
        chunks: Iterable[tuple[str, Sequence[str]]],
        *,
        batch_size: int,
        max_buffered: int,
        lease_ms: int,
        register: Mapping[str, Any] | None = None,
    ) -> list[AppendResult]:
        """Append several (group, items) chunks in one pipelined round trip; one result each.

        Each chunk is atomic (all accepted or none); chunks are independent of each other.
        """
        chunk_list = list(chunks)

        def build(pipe: Any) -> None:
            if register is not None:
                self._queue_register(pipe, register)
            for group, entries in chunk_list:
                key = self.keys.batch_buffer(self.batch_name, group)
                APPEND.queue(
                    pipe, (key,), (self.prefix, group, batch_size, max_buffered, lease_ms, *entries)
                )

        try:
            replies = run_pipeline(self.client, build)
        except redis.exceptions.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            raise self._full(exc) from exc
        return [self._append_result(r) for r in replies[len(replies) - len(chunk_list) :]]

    def _full(self, exc: Exception) -> BufferUnavailable:
        # Redis refuses a script's write under maxmemory only while the script has written
        # nothing (it keeps a script atomic), so the refused append left no item behind. The
        # refusal comes as redis-py's OutOfMemoryError when Redis checks before the script
        # runs, and as a script error quoting the OOM reply when its first write is refused.
        where = self.client.connection_pool.connection_kwargs
        url = f"redis://{where.get('host', '?')}:{where.get('port', '?')}/{where.get('db', 0)}"
        return BufferUnavailable(self.batch_name, url, f"{OUT_OF_MEMORY}: {exc}")

    def _queue_register(self, pipe: Any, register: Mapping[str, Any]) -> None:
        pipe.hset(self.keys.batch_conf(self.batch_name), mapping=dict(register))
        pipe.sadd(self.keys.batch_registry(), self.batch_name)

    @staticmethod
    def _append_result(reply: list[Any]) -> AppendResult:
        if int(reply[0]) < 0:
            return AppendResult(False, int(reply[1]))
        claimed = [Claimed(text(reply[i]), "", int(reply[i + 1])) for i in range(2, len(reply), 2)]
        return AppendResult(True, int(reply[1]), claimed, int(reply[0]) == 1)

    def register(self, definition: Mapping[str, Any]) -> None:
        """Store the batch's definition and list its name, for reapers and inspection."""
        pipe = self.client.pipeline(transaction=False)
        self._queue_register(pipe, definition)
        pipe.execute()

    # --- the reaper -------------------------------------------------------------------------
    def reap(
        self,
        *,
        max_wait_ms: int,
        batch_size: int,
        lease_ms: int,
        reason: str = "age",
        leases: bool = True,
        limit: int = 1000,
    ) -> tuple[list[Claimed], list[Claimed]]:
        """Claim aged buffers and re-arm expired leases: (claimed, to republish)."""
        reply = REAP(
            self.client,
            (self.keys.batch_oldest(self.batch_name),),
            (self.prefix, max_wait_ms, batch_size, lease_ms, limit, reason, 1 if leases else 0),
        )
        return self._reap_result(reply)

    def queue_reap(
        self, pipe: Any, *, max_wait_ms: int, batch_size: int, lease_ms: int, limit: int = 1000
    ) -> None:
        """Add a reap of this batch name to a pipeline (see :meth:`reap_result`)."""
        REAP.queue(
            pipe,
            (self.keys.batch_oldest(self.batch_name),),
            (self.prefix, max_wait_ms, batch_size, lease_ms, limit, "age", 1),
        )

    @staticmethod
    def _reap_result(reply: list[Any]) -> tuple[list[Claimed], list[Claimed]]:
        claimed, republished = reply
        return (
            [Claimed(text(c[0]), text(c[1]), int(c[2])) for c in claimed],
            [Claimed(text(c[0]), text(c[1]), int(c[2] or 0)) for c in republished],
        )

    reap_result = _reap_result

    # --- workers ----------------------------------------------------------------------------
    def acquire(
        self, batch_id: str, token: str, lease_ms: int, max_deliveries: int = 0
    ) -> Acquired:
        """Take a batch for processing under a lease owned by ``token``; "crashed" when its
        runs already killed their process ``max_deliveries`` times (0: no bound)."""
        reply = ACQUIRE(
            self.client,
            (self.keys.batch_meta(self.batch_name, batch_id),),
            (self.prefix, batch_id, token, lease_ms, max_deliveries),
        )
        status = text(reply[0])
        if status == "crashed":
            return Acquired(status, deliveries=int(reply[1]))
        if status != "ok":
            return Acquired(status)
        return Acquired(
            status,
            text(reply[1]),
            int(reply[2] or 0),
            int(reply[3]),
            bool(int(reply[4])),
            tuple(reply[5:]),
        )

    def renew(self, batch_id: str, token: str, lease_ms: int) -> bool:
        """Extend the lease of a batch this worker still owns."""
        return bool(
            RENEW(
                self.client,
                (self.keys.batch_meta(self.batch_name, batch_id),),
                (self.prefix, batch_id, token, lease_ms),
            )
        )

    def complete(self, batch_id: str) -> int:
        """Finish a batch that succeeded; its item count, or -1 when already finished."""
        return int(
            COMPLETE(
                self.client,
                (self.keys.batch_meta(self.batch_name, batch_id),),
                (self.prefix, batch_id),
            )
        )

    def fail(
        self,
        batch_id: str,
        token: str,
        *,
        max_retries: int,
        backoff_ms: int,
        lease_ms: int,
        error: str,
        failed: Sequence[int] | None = None,
    ) -> Failed:
        """Record a failure of the whole batch (``failed`` None) or of the items at ``failed``."""
        partial = () if failed is None else ("1", *failed)
        reply = FAIL(
            self.client,
            (self.keys.batch_meta(self.batch_name, batch_id),),
            (
                self.prefix,
                batch_id,
                token,
                max_retries,
                backoff_ms,
                lease_ms,
                error,
                *(partial or ("0",)),
            ),
        )
        return Failed(text(reply[0]), int(reply[1]), int(reply[2]))

    # --- dead letters -----------------------------------------------------------------------
    def dead_ids(self, limit: int = 1000) -> list[str]:
        """Ids of dead batches, oldest death first."""
        ids = self.client.zrange(self.keys.batch_dead(self.batch_name), 0, limit - 1)
        return [text(i) for i in ids]

    def describe(self, batch_id: str, *, items: int = 0) -> dict[str, Any] | None:
        """The meta fields of a batch, plus its first ``items`` items (raw JSON text)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.batch_meta(self.batch_name, batch_id))
        pipe.lrange(self.keys.batch_items(self.batch_name, batch_id), 0, items - 1)
        meta, entries = pipe.execute()
        if not meta:
            return None
        out: dict[str, Any] = {text(k): text(v) for k, v in meta.items()}
        if items:
            out["items"] = [text(e) for e in entries]
        return out

    def requeue(self, batch_id: str, lease_ms: int) -> Claimed | None:
        """Move a dead batch back in flight; the caller publishes it."""
        reply = REQUEUE(
            self.client, (self.keys.batch_dead(self.batch_name),), (self.prefix, batch_id, lease_ms)
        )
        if not reply:
            return None
        return Claimed(text(reply[0]), text(reply[1]), int(reply[2]))

    def purge(self, batch_id: str) -> int:
        """Delete a dead batch; its item count, or -1 when it is not dead."""
        return int(
            PURGE(self.client, (self.keys.batch_dead(self.batch_name),), (self.prefix, batch_id))
        )

    # --- inspection -------------------------------------------------------------------------
    def snapshot(self, limit: int = 10_000) -> dict[str, Any]:
        """Raw state of the batch name: groups, in-flight and dead batches, counters."""
        now, groups, inflight, dead, stats, pending = INSPECT(
            self.client, (self.keys.batch_groups(self.batch_name),), (self.prefix, limit)
        )
        flat = [text(v) for v in stats]
        return {
            "now_ms": int(now),
            "groups": [(text(g), int(n), int(text(o)) if text(o) else None) for g, n, o in groups],
            "inflight": [(text(g), text(s), int(n or 0)) for g, s, n in inflight],
            "dead": [(text(g), text(s), int(n or 0)) for g, s, n in dead],
            "stats": {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)},
            "pending": int(pending),
        }
