"""The one path a batch item takes into Redis, shared by ``.delay``, ``.add_many`` and the
buffered producer: encode and group, append in chunks (registering the batch's definition with
the first append), map Redis errors to taskyard's, and publish the batches that filled.

:class:`BatchProducer` is one batch definition bound to one app
(:meth:`taskyard.batching.definition.BatchDefinition.state` makes and keeps one per app); the
definition and :mod:`taskyard.batching.buffered` call it and nothing else to produce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskyard import serialization
from taskyard.batching.buffer import AppendResult, BatchBuffer, Claimed
from taskyard.errors import BatchBufferFull, BatchItemError, BufferUnavailable
from taskyard.routing.levels import Priority
from taskyard.runtime import Runtime, TaskyardApp
from taskyard.signals import batch_flushed

log = logging.getLogger(__name__)

#: Items per APPEND call of a chunked append: large enough to amortise the call, small enough
#: that one script never holds Redis for long (about a millisecond).
CHUNK = 2000
MAX_GROUP_CHARS = 256
#: Redis errors meaning the buffers cannot be reached (BusyLoadingError is a ConnectionError).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)


class AddResult(NamedTuple):
    """What ``.delay``/``.add_many`` did: items accepted, batches it flushed (ids)."""

    accepted: int
    batch_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """A batch's options resolved for one app: decorator value, else the app's setting."""

    batch_size: int
    max_wait_s: float
    level: Priority
    max_buffered: int
    max_item_bytes: int
    lease_s: float
    max_retries: int
    retry_backoff_s: float
    #: Runs that killed their process before the batch goes dead as "crashed".
    max_deliveries: int = 5

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    def registration(self, task_name: str) -> dict[str, Any]:
        """The definition stored in Redis, so any process can reap this batch name."""
        return {
            "task": task_name,
            "level": self.level.value,
            "batch_size": self.batch_size,
            "max_wait_ms": int(self.max_wait_s * 1000),
            "lease_ms": self.lease_ms,
            "max_buffered": self.max_buffered,
        }


class Chunk(NamedTuple):
    """Encoded items of one group, appended atomically; ``positions`` name them to the caller
    (an index in ``.add_many``'s input, a sequence number in the buffered producer)."""

    group: str
    entries: list[str]
    positions: list[int]


class Appended(NamedTuple):
    """What a chunked append did, over all its chunks."""

    accepted: int
    claims: list[Claimed]
    #: Positions of the items in refused chunks (their batch name held ``max_buffered``).
    refused: list[int]
    #: Items the batch name held, the largest figure any chunk reported, and the largest any
    #: refused chunk reported (0 when none was refused).
    pending: int
    pending_at_refusal: int


def chunks_of(groups: dict[str, tuple[list[str], list[int]]]) -> list[Chunk]:
    """Cut each group's (entries, positions) into chunks of at most :data:`CHUNK` items."""
    return [
        Chunk(group, entries[start : start + CHUNK], positions[start : start + CHUNK])
        for group, (entries, positions) in groups.items()
        for start in range(0, len(entries), CHUNK)
    ]


class BatchProducer:
    """One batch definition bound to one app: its runtime, buffer, options and producer calls."""

    def __init__(
        self,
        app: TaskyardApp,
        runtime: Runtime,
        options: BatchOptions,
        *,
        task_name: str,
        batch_name: str,
        key: Callable[[Any], Any] | None,
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.options = options
        self.task_name = task_name
        self.batch_name = batch_name
        self.key = key
        self.buffer = BatchBuffer(runtime.redis, runtime.keys, batch_name)
        # The definition goes to Redis with the first append of each process and app.
        self._registered = False

    # --- items ------------------------------------------------------------------------------
    def encode(self, item: Any) -> str:
        """The item as compact JSON text.

        Raises:
            BatchItemError: not JSON-encodable, nested too deeply, or over ``max_item_bytes``.
        """
        try:
            text = serialization.dumps(item)
        except RecursionError:
            raise BatchItemError(
                self.batch_name,
                f"an item of type {type(item).__name__} is nested too deeply to encode as JSON",
                item_type=type(item).__name__,
            ) from None
        except serialization.ENCODE_ERRORS as exc:
            raise BatchItemError(
                self.batch_name,
                f"an item of type {type(item).__name__} is not JSON-encodable ({exc})",
                item_type=type(item).__name__,
            ) from None
        limit = self.options.max_item_bytes
        if len(text) > limit:  # ASCII-only JSON: characters are bytes
            raise BatchItemError(
                self.batch_name,
                f"an item of type {type(item).__name__} encodes to {len(text)} "
                f"bytes, over max_item_bytes={limit}",
                item_type=type(item).__name__,
                size=len(text),
            )
        return text

    def group_of(self, item: Any) -> str:
        """The buffer (grouping key) an item goes to: "" without a key function."""
        if self.key is None:
            return ""
        try:
            group = self.key(item)
        except Exception as exc:
            raise BatchItemError(
                self.batch_name,
                f"key function failed on an item of type {type(item).__name__}: {exc!r}",
                item_type=type(item).__name__,
            ) from exc
        text = group if isinstance(group, str) else str(group)
        if len(text) > MAX_GROUP_CHARS:
            raise BatchItemError(
                self.batch_name,
                f"key {text[:40]!r}... is {len(text)} characters, over {MAX_GROUP_CHARS}",
                item_type=type(item).__name__,
            )
        return text

    def group(self, items: Iterable[Any]) -> list[Chunk]:
        """Encode ``items`` and cut them into chunks per group; positions are input indices.

        Raises:
            BatchItemError: an item cannot be encoded or grouped (nothing is appended).
        """
        encode = self.encode
        groups: dict[str, tuple[list[str], list[int]]] = {}
        if self.key is None:
            entries = [encode(item) for item in items]
            groups[""] = (entries, list(range(len(entries))))
        else:
            for index, item in enumerate(items):
                bucket = groups.setdefault(self.group_of(item), ([], []))
                bucket[0].append(encode(item))
                bucket[1].append(index)
        return chunks_of(groups)

    # --- appending --------------------------------------------------------------------------
    def add(self, item: Any) -> AddResult:
        """Append one item in one Redis round trip; publish the batch it filled.

        Raises:
            BatchItemError, BatchBufferFull, BufferUnavailable: as ``BatchDefinition.delay``.
        """
        opts = self.options
        entry = self.encode(item)
        group = self.group_of(item)
        result = self._append(
            lambda register: [
                self.buffer.append(
                    group,
                    (entry,),
                    batch_size=opts.batch_size,
                    max_buffered=opts.max_buffered,
                    lease_ms=opts.lease_ms,
                    register=register,
                )
            ]
        )[0]
        if not result.accepted:
            raise BatchBufferFull(self.batch_name, result.pending, opts.max_buffered)
        if result.claimed:
            self.publish([Claimed(c.batch_id, group, c.size) for c in result.claimed], "size")
        return AddResult(1, tuple(c.batch_id for c in result.claimed))

    def append_chunks(self, chunks: list[Chunk]) -> Appended:
        """Append ``chunks`` in one pipelined round trip, each atomic, and publish the batches
        they filled. A refused chunk (full buffer) leaves the others appended.

        Raises:
            BufferUnavailable: Redis cannot be reached; nothing was accepted.
        """
        opts = self.options
        results = self._append(
            lambda register: self.buffer.append_many(
                ((chunk.group, chunk.entries) for chunk in chunks),
                batch_size=opts.batch_size,
                max_buffered=opts.max_buffered,
                lease_ms=opts.lease_ms,
                register=register,
            )
        )
        claims: list[Claimed] = []
        refused: list[int] = []
        accepted = pending = pending_at_refusal = 0
        for chunk, result in zip(chunks, results, strict=True):
            pending = max(pending, result.pending)
            if result.accepted:
                accepted += len(chunk.entries)
                claims.extend(Claimed(c.batch_id, chunk.group, c.size) for c in result.claimed)
            else:
                refused.extend(chunk.positions)
                pending_at_refusal = max(pending_at_refusal, result.pending)
        if claims:
            self.publish(claims, "size")
        return Appended(accepted, claims, refused, pending, pending_at_refusal)

    def _append(
        self, run: Callable[[dict[str, Any] | None], list[AppendResult]]
    ) -> list[AppendResult]:
        """``run(register)`` with the definition to register on this process's first append;
        registers it apart when Redis lost it; Redis unreachable -> BufferUnavailable."""
        register = None
        if not self._registered:
            register = self.options.registration(self.task_name)
            self._registered = True
        try:
            results = run(register)
            if any(r.unregistered for r in results):
                self.buffer.register(self.options.registration(self.task_name))
        except UNREACHABLE as exc:
            self._registered = False  # the definition may not have reached Redis
            raise self.unavailable(exc) from exc
        return results

    def claim_all(self, reason: str) -> list[Claimed]:
        """Claim every buffered item now, whatever its age, and publish the batches.

        Raises:
            BufferUnavailable: Redis cannot be reached.
        """
        opts = self.options
        try:
            claims, _ = self.buffer.reap(
                max_wait_ms=-1,
                batch_size=opts.batch_size,
                lease_ms=opts.lease_ms,
                reason=reason,
                leases=False,
            )
        except UNREACHABLE as exc:
            raise self.unavailable(exc) from exc
        self.publish(claims, reason)
        return claims

    def unavailable(self, exc: Exception) -> BufferUnavailable:
        """The error for the caller when Redis could not be reached."""
        url = maybe_sanitize_url(self.runtime.settings.effective_redis_url)
        return BufferUnavailable(self.batch_name, url, f"{type(exc).__name__}: {exc}")

    def publish(self, claims: list[Claimed], reason: str | None) -> int:
        """:func:`publish` this batch's claimed batches to its level."""
        return publish(
            self.app, self.task_name, self.options.level.value, self.batch_name, claims, reason
        )


def publish(
    app: TaskyardApp,
    task_name: str,
    queue: str,
    batch_name: str,
    claims: list[Claimed],
    reason: str | None,
) -> int:
    """Publish one flush message per claimed batch; announce new batches (``reason`` set).

    A message that cannot be published is not an error for the caller: its batch is in flight
    under a lease, and the reaper republishes it when the lease runs out. Returns how many were
    published.
    """
    if reason is not None:
        for claim in claims:
            batch_flushed.send(
                sender=batch_name,
                group=claim.group,
                batch_id=claim.batch_id,
                size=claim.size,
                reason=reason,
            )
    if not claims:
        return 0
    task = app.tasks.get(task_name) if app.conf.task_always_eager else None
    if task is not None:
        # Eager mode (unit tests, scripts): the batches run here and now, like eager tasks.
        for claim in claims:
            task.apply(args=[claim.batch_id])
        return len(claims)
    sent = 0
    flow = getattr(app.tasks.get(task_name), "taskyard_flow", None)
    partitioned = bool(getattr(flow, "partitioned", False))
    try:
        with app.producer_or_acquire() as producer:
            for claim in claims:
                app.send_task(
                    task_name,
                    args=[claim.batch_id],
                    queue=queue,
                    routing_key=queue,
                    producer=producer,
                    # partition_by="key": the fetch shares and limits per batch key.
                    headers={"taskyard_partition": claim.group} if partitioned else None,
                )
                sent += 1
    except Exception as exc:
        log.warning(
            "batch %s: %d flush messages not published (%s); the reaper republishes "
            "them when their lease runs out",
            batch_name,
            len(claims) - sent,
            exc,
            exc_info=True,
        )
    return sent
