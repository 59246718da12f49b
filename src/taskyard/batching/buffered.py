"""The buffered batch producer (opt-in): ``.delay(item)`` without a Redis round trip per item.

``@batch_task(..., linger_ms=5)`` (or ``with send_notification_batch.buffered() as buf:``)
checks and encodes each item at once, as ``.delay`` does, so a bad item raises in the caller,
then a background thread appends what gathered every ``linger_ms`` through the same pipelined
append that ``.add_many`` uses. What that changes, and how each case is handled:

- **Durability**: an item is in Redis (where ``.delay`` puts it) only once :meth:`flush`
  returns; until then it lives in this process. The default ``.delay`` stays durable on return.
- **Exit**: an ``atexit`` hook flushes every producer, so a script that appends and returns
  loses nothing. ``os._exit``, SIGKILL or a crash lose what was not flushed yet.
- **Fork**: the child starts with an empty buffer and its own thread (started by its first
  item); the parent's pending items stay the parent's, so none is appended twice.
- **Full buffers**: Redis refuses items once the batch name holds ``max_buffered``. The refusal
  is found by the background append; it is counted (:attr:`BufferedProducer.rejected`), logged,
  and raised to the next caller of :meth:`flush` as :class:`BatchBufferFull` (``accepted``
  since the previous flush, and the ``rejected`` items' sequence numbers: the n-th ``delay`` on
  this producer in this process is number n, from 0).
- **Redis unreachable**: nothing is dropped; the items stay buffered and are retried, and
  :meth:`flush` raises ``BufferUnavailable``. At most ``max_pending`` items are held: the item
  that finds the buffer full flushes in the caller's thread (back-pressure), raising if Redis
  is still down.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from types import TracebackType
from typing import Any

from taskyard.batching.producer import AddResult, BatchOptions, BatchProducer, chunks_of
from taskyard.errors import BatchBufferFull, BufferUnavailable

log = logging.getLogger(__name__)

#: Default linger of :meth:`BatchDefinition.buffered` (ms): items wait at most this long in
#: the process before the background thread appends them.
DEFAULT_LINGER_MS = 5.0
#: Items one producer holds at most (also capped by the batch's max_buffered): bounds the
#: process's memory and the loss on a crash.
MAX_PENDING = 100_000
#: Pause of the background thread after Redis could not be reached (s).
RETRY_PAUSE_S = 0.5

_producers: weakref.WeakSet[BufferedProducer] = weakref.WeakSet()
#: The buffered producer of each batch bound to an app (BatchDefinition.state keeps one
#: BatchProducer per definition and app, so this is one per definition and app).
_by_target: weakref.WeakKeyDictionary[BatchProducer, BufferedProducer] = weakref.WeakKeyDictionary()
_hooks_installed = False


class BufferedProducer:
    """An in-process buffer in front of one batch definition on one app."""

    def __init__(
        self, target: BatchProducer, linger_ms: float, max_pending: int = MAX_PENDING
    ) -> None:
        #: The batch bound to its app, through which the held items are appended.
        self.target = target
        self.app = target.app
        self.batch_name = target.batch_name
        self.linger_s = max(0.0, float(linger_ms)) / 1000
        self.max_pending = max_pending
        #: Items appended to Redis, refused by a full buffer, and appends that found Redis
        #: unreachable, since this producer started (in this process).
        self.appended = 0
        self.rejected = 0
        self.unavailable = 0
        self._reset()
        _producers.add(self)
        _install_hooks()

    def _reset(self) -> None:
        # Also the fork hook: the child's locks are new (a parent's thread may have held the
        # old ones at fork time) and its buffer is empty.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: (sequence number, group, encoded item), oldest first. deque.append and popleft are
        #: atomic, so producers never take a lock on the per-item path.
        self._pending: deque[tuple[int, str, str]] = deque()
        self._sequence = itertools.count()  # next() is atomic too
        self._accepted_since_flush = 0
        self._refused: list[int] = []
        self._buffered_at_refusal = 0
        self._limit: int | None = None

    # --- producing ----------------------------------------------------------------------------
    def delay(self, item: Any) -> AddResult:
        """Check and encode ``item`` now, append it to Redis soon (durable after :meth:`flush`).

        Raises:
            BatchItemError: the item is not JSON-encodable, too deep or too large (at once).
            BatchBufferFull, BufferUnavailable: only when the local buffer was full and the
                flush this call then made failed.
        """
        target = self.target
        limit = self._limit
        if limit is None:
            limit = self._limit = min(self.max_pending, target.options.max_buffered)
        entry = target.encode(item)
        pending = self._pending
        pending.append((next(self._sequence), target.group_of(item), entry))
        if self._thread is None:
            self._start()
        wake = self._wake
        if not wake.is_set():  # set at most once per linger: the thread clears it per round
            wake.set()
        if len(pending) >= limit:
            self.flush()
        return AddResult(1, ())

    def add_many(self, items: Any) -> AddResult:
        """:meth:`delay` for each of ``items``; returns how many were taken."""
        n = 0
        for item in items:
            self.delay(item)
            n += 1
        return AddResult(n, ())

    @property
    def pending(self) -> int:
        """Items held in this process, not yet appended to Redis."""
        return len(self._pending)

    # --- flushing -----------------------------------------------------------------------------
    def flush(self) -> int:
        """Append everything held now; return once it is in Redis. Returns how many it took.

        Raises:
            BatchBufferFull: Redis refused items since the previous flush (full buffer); the
                error says how many were accepted and which positions were refused.
            BufferUnavailable: Redis cannot be reached; the items stay held and are retried.
        """
        appended = self._drain()
        with self._lock:
            refused, self._refused = self._refused, []
            accepted, self._accepted_since_flush = self._accepted_since_flush, 0
            buffered = self._buffered_at_refusal
        if refused:
            raise BatchBufferFull(
                self.batch_name,
                buffered,
                self.target.options.max_buffered,
                accepted=accepted,
                rejected=tuple(refused),
            )
        return appended

    def _drain(self) -> int:
        """Append what is held (one pipelined round trip per 2,000-item chunk); thread-safe."""
        with self._drain_lock:
            pending = self._pending
            taken = [pending.popleft() for _ in range(len(pending))]
            if not taken:
                return 0
            try:
                self._append(taken)
            except BufferUnavailable:
                pending.extendleft(reversed(taken))  # nothing accepted: keep them, in order
                with self._lock:
                    self.unavailable += 1
                raise
            return len(taken)

    def _append(self, taken: list[tuple[int, str, str]]) -> None:
        groups: dict[str, tuple[list[str], list[int]]] = {}
        for position, group, entry in taken:
            bucket = groups.setdefault(group, ([], []))
            bucket[0].append(entry)
            bucket[1].append(position)
        done = self.target.append_chunks(chunks_of(groups))  # BufferUnavailable: none taken
        with self._lock:
            self.appended += done.accepted
            self._accepted_since_flush += done.accepted
            if done.refused:
                self.rejected += len(done.refused)
                self._refused.extend(done.refused)
                self._buffered_at_refusal = done.pending_at_refusal
        if done.refused:
            opts: BatchOptions = self.target.options
            log.warning(
                "batch %s: %d buffered items refused, the batch name holds %d "
                "(max_buffered=%d); raised by the next flush()",
                self.batch_name,
                len(done.refused),
                done.pending_at_refusal,
                opts.max_buffered,
            )

    # --- the background thread ------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._start_locked()

    def _start_locked(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"taskyard-buffer-{self.batch_name}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            self._wake.wait()
            self._wake.clear()
            if self.linger_s:
                time.sleep(self.linger_s)  # the linger: let items gather into one append
            try:
                self._drain()
            except BufferUnavailable:
                time.sleep(RETRY_PAUSE_S)
            except Exception:  # never let the thread die: the items stay held for flush()
                log.exception("batch %s: background append failed", self.batch_name)
                time.sleep(RETRY_PAUSE_S)
            if self._pending:
                self._wake.set()

    # --- context manager --------------------------------------------------------------------
    def __enter__(self) -> BufferedProducer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.flush()
            return
        try:  # an exception is already on its way: flush what we can, without masking it
            self.flush()
        except Exception:
            log.exception("batch %s: flush on leaving the buffered block failed", self.batch_name)

    def __repr__(self) -> str:
        return (
            f"<BufferedProducer {self.batch_name} linger_ms="
            f"{self.linger_s * 1000:g} pending={self.pending}>"
        )


def producer_for(target: BatchProducer, linger_ms: float | None) -> BufferedProducer:
    """The buffered producer of a batch bound to an app (one each); ``linger_ms`` None keeps
    the producer's linger (:data:`DEFAULT_LINGER_MS` for a new one)."""
    producer = _by_target.get(target)
    if producer is None:
        producer = BufferedProducer(target, DEFAULT_LINGER_MS if linger_ms is None else linger_ms)
        _by_target[target] = producer
    elif linger_ms is not None:
        producer.linger_s = max(0.0, float(linger_ms)) / 1000
    return producer


def existing_producer(target: BatchProducer) -> BufferedProducer | None:
    """The buffered producer of ``target`` if this process made one."""
    return _by_target.get(target)


def flush_all() -> None:
    """Flush every producer of this process (the exit hook); failures are logged."""
    for producer in list(_producers):
        if not producer._pending and not producer._refused:
            continue
        try:
            producer.flush()
        except Exception as exc:
            log.error(
                "batch %s: %d buffered items not appended at exit: %s",
                producer.batch_name,
                producer.pending,
                exc,
            )


def _after_fork_in_child() -> None:
    for producer in list(_producers):
        producer._reset()


def _install_hooks() -> None:
    # Installed with the first producer, not on import: importing the module changes nothing.
    global _hooks_installed
    if not _hooks_installed:
        _hooks_installed = True
        atexit.register(flush_all)
        os.register_at_fork(after_in_child=_after_fork_in_child)
