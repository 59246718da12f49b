"""A batch definition: its options, per-app resolution, and the append/claim/publish calls.

The flush task, the reaper and inspection depend on this module; the ``@batch_task`` decorator
(:mod:`taskyard.batching.decorator`) builds a definition and binds its flush task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from kombu.utils.url import maybe_sanitize_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskyard import serialization
from taskyard.batching.buffer import BatchBuffer, Claimed
from taskyard.config import Settings
from taskyard.errors import BatchBufferFull, BatchItemError, BufferUnavailable, ConfigurationError
from taskyard.routing.levels import Priority
from taskyard.runtime import Runtime, current_taskyard_app, runtime_of
from taskyard.signals import batch_flushed

if TYPE_CHECKING:
    from taskyard.batching.buffered import BufferedProducer

log = logging.getLogger(__name__)

#: Items per APPEND call of add_many: large enough to amortise the call, small enough that one
#: script never holds Redis for long (about a millisecond).
_CHUNK = 2000
_MAX_GROUP_CHARS = 256
#: Redis errors meaning the buffers cannot be reached (BusyLoadingError is a ConnectionError).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)


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


def check_number(
    name: str, value: Any, *, minimum: float, strict: bool, integer: bool = False, allowed: str
) -> None:
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if not bad:
        bad = value <= minimum if strict else value < minimum
    if bad:
        raise ConfigurationError(
            f"{name}={value!r} is not allowed; expected {allowed}", setting=name, value=value
        )


class _AppState(NamedTuple):
    app: Any
    runtime: Runtime
    buffer: BatchBuffer
    options: BatchOptions


class BatchDefinition:
    """A function fed with batches of items, with its options and producer calls.

    ``.delay(item)`` and ``.add_many(items)`` buffer items; calling the object calls the
    function directly with a list. ``.task`` (the Celery task that processes one batch) is bound
    by :func:`taskyard.batching.decorator.batch_task`.
    """

    task: Any

    def __init__(
        self,
        fn: Callable[[list[Any]], Any],
        *,
        batch_name: str,
        batch_size: int,
        max_wait: float,
        level: Priority,
        key: Callable[[Any], Any] | None,
        max_buffered: int | None,
        max_item_bytes: int | None,
        lease_s: float | None,
        max_retries: int | None,
        retry_backoff_s: float | None,
        name: str | None = None,
        app: Any = None,
        max_deliveries: int | None = None,
        linger_ms: float | None = None,
    ) -> None:
        self.fn = fn
        self.batch_name = batch_name
        self.batch_size = batch_size
        self.max_wait = float(max_wait)
        self.level = level
        self.key = key
        # None: the app's TASKYARD_BATCH__* setting applies (resolved in options()).
        self.max_buffered = max_buffered
        self.max_item_bytes = max_item_bytes
        self.lease_s = lease_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_deliveries = max_deliveries
        #: Not None: .delay() goes through the process's buffered producer (batching/buffered.py).
        self.linger_ms = linger_ms
        self.__name__ = getattr(fn, "__name__", batch_name)
        self.__doc__ = fn.__doc__
        self.__module__ = fn.__module__
        self.name = name or f"{fn.__module__}.{self.__name__}"
        #: The taskyard app given as ``app=``; None: the current taskyard app.
        self.app = app
        self._states: dict[int, _AppState] = {}
        self._last: _AppState | None = None
        self._registered_for: _AppState | None = None

    def __call__(self, items: list[Any]) -> Any:
        return self.fn(items)

    def __repr__(self) -> str:
        return f"<batch_task {self.name} batch_name={self.batch_name!r}>"

    # --- options ----------------------------------------------------------------------------
    def options(self, settings: Settings) -> BatchOptions:
        """This batch's options for an app with ``settings`` (decorator > app setting)."""
        defaults = settings.batch

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return BatchOptions(
            batch_size=self.batch_size,
            max_wait_s=self.max_wait,
            level=self.level,
            max_buffered=int(pick(self.max_buffered, defaults.max_buffered)),
            max_item_bytes=int(pick(self.max_item_bytes, defaults.max_item_bytes)),
            lease_s=float(pick(self.lease_s, defaults.lease_s)),
            max_retries=int(pick(self.max_retries, defaults.max_retries)),
            retry_backoff_s=float(pick(self.retry_backoff_s, defaults.retry_backoff_s)),
            max_deliveries=int(pick(self.max_deliveries, settings.max_deliveries)),
        )

    def state(self, app: Any = None) -> _AppState:
        """Runtime, buffer and options of this batch for ``app``.

        Default: the app given as ``app=``, else the current taskyard app (never a plain Celery
        app, in any thread; see :func:`~taskyard.runtime.current_taskyard_app`).
        """
        if app is None:
            app = self.app if self.app is not None else current_taskyard_app()
        last = self._last
        if last is not None and last.app is app:
            return last
        state = self._states.get(id(app))
        if state is None or state.app is not app:  # an id reused by a new app: a new state
            runtime = runtime_of(app)
            state = _AppState(
                app,
                runtime,
                BatchBuffer(runtime.redis, runtime.keys, self.batch_name),
                self.options(runtime.settings),
            )
            self._states[id(app)] = state
        self._last = state
        return state

    def _unavailable(self, state: _AppState, exc: Exception) -> NoReturn:
        url = maybe_sanitize_url(state.runtime.settings.effective_redis_url)
        raise BufferUnavailable(self.batch_name, url, f"{type(exc).__name__}: {exc}") from exc

    # --- producers --------------------------------------------------------------------------
    def encode(self, item: Any, limit: int) -> str:
        """The item as compact JSON text.

        Raises:
            BatchItemError: not JSON-encodable, or longer than ``limit`` bytes.
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
        if len(text) > _MAX_GROUP_CHARS:
            raise BatchItemError(
                self.batch_name,
                f"key {text[:40]!r}... is {len(text)} characters, over {_MAX_GROUP_CHARS}",
                item_type=type(item).__name__,
            )
        return text

    def _registration(self, state: _AppState) -> dict[str, Any] | None:
        # The definition goes to Redis with the first append of each process and app.
        if self._registered_for is state:
            return None
        self._registered_for = state
        return state.options.registration(self.name)

    def delay(self, item: Any) -> AddResult:
        """Append one item to its buffer in one Redis round trip.

        When the buffer reaches ``batch_size`` the same script claims the batch, and one Celery
        message carrying the batch id is published to the batch's level.

        Raises:
            BatchItemError: the item is not JSON-encodable, nested too deeply, or too large.
            BatchBufferFull: the batch name already holds ``max_buffered`` items.
            BufferUnavailable: Redis cannot be reached (a ``BrokerUnavailable``).
        """
        if self.linger_ms is not None:  # opt-in: durable after buffered().flush()
            return self.buffered().delay(item)
        state = self.state()
        opts = state.options
        entry = self.encode(item, opts.max_item_bytes)
        group = self.group_of(item)
        try:
            result = state.buffer.append(
                group,
                (entry,),
                batch_size=opts.batch_size,
                max_buffered=opts.max_buffered,
                lease_ms=opts.lease_ms,
                register=self._registration(state),
            )
            if result.unregistered:
                state.buffer.register(opts.registration(self.name))
        except _UNREACHABLE as exc:
            self._registered_for = None  # the definition may not have reached Redis
            self._unavailable(state, exc)
        if not result.accepted:
            raise BatchBufferFull(self.batch_name, result.pending, opts.max_buffered)
        if result.claimed:
            claims = [Claimed(c.batch_id, group, c.size) for c in result.claimed]
            publish(state.app, self.name, opts.level.value, self.batch_name, claims, "size")
        return AddResult(1, tuple(c.batch_id for c in result.claimed))

    def add_many(self, items: Iterable[Any]) -> AddResult:
        """Append many items in one pipelined round trip, forming every full batch.

        Items are appended in chunks, each atomic; when ``max_buffered`` refuses a chunk the
        other chunks still count, and :class:`BatchBufferFull` says how many were accepted.

        Raises:
            BatchItemError: an item is not JSON-encodable, nested too deeply, or too large
                (nothing was appended).
            BatchBufferFull: some items were refused (``accepted``/``rejected`` on the error).
            BufferUnavailable: Redis cannot be reached (a ``BrokerUnavailable``).
        """
        state = self.state()
        opts = state.options
        groups: dict[str, tuple[list[str], list[int]]] = {}
        encode = self.encode
        limit = opts.max_item_bytes
        if self.key is None:
            entries = [encode(item, limit) for item in items]
            groups[""] = (entries, list(range(len(entries))))
        else:
            for index, item in enumerate(items):
                bucket = groups.setdefault(self.group_of(item), ([], []))
                bucket[0].append(encode(item, limit))
                bucket[1].append(index)
        chunks: list[tuple[str, list[str], list[int]]] = []
        for group, (entries, indices) in groups.items():
            for start in range(0, len(entries), _CHUNK):
                chunks.append(
                    (group, entries[start : start + _CHUNK], indices[start : start + _CHUNK])
                )
        if not chunks or not chunks[0][1]:
            return AddResult(0, ())
        try:
            results = state.buffer.append_many(
                ((g, e) for g, e, _ in chunks),
                batch_size=opts.batch_size,
                max_buffered=opts.max_buffered,
                lease_ms=opts.lease_ms,
                register=self._registration(state),
            )
            if any(r.unregistered for r in results):
                state.buffer.register(opts.registration(self.name))
        except _UNREACHABLE as exc:
            self._registered_for = None
            self._unavailable(state, exc)
        claims: list[Claimed] = []
        accepted, rejected, pending = 0, [], 0
        for (group, entries, indices), result in zip(chunks, results, strict=True):
            pending = max(pending, result.pending)
            if result.accepted:
                accepted += len(entries)
                claims.extend(Claimed(c.batch_id, group, c.size) for c in result.claimed)
            else:
                rejected.extend(indices)
        if claims:
            publish(state.app, self.name, opts.level.value, self.batch_name, claims, "size")
        if rejected:
            raise BatchBufferFull(
                self.batch_name,
                pending,
                opts.max_buffered,
                accepted=accepted,
                rejected=tuple(sorted(rejected)),
            )
        return AddResult(accepted, tuple(c.batch_id for c in claims))

    def buffered(self, app: Any = None, *, linger_ms: float | None = None) -> BufferedProducer:
        """This process's buffered producer of this batch: ``.delay`` without a round trip per
        item, durable after its ``flush()`` (see :mod:`taskyard.batching.buffered`)."""
        from taskyard.batching.buffered import producer_for

        return producer_for(
            self, self.state(app).app, self.linger_ms if linger_ms is None else linger_ms
        )

    def flush(self) -> AddResult:
        """Claim every buffered item now, whatever its age (reason "manual")."""
        from taskyard.batching.buffered import existing_producer

        state = self.state()
        opts = state.options
        producer = existing_producer(self, state.app)
        if producer is not None:  # this process's held items first
            producer.flush()
        try:
            claims, _ = state.buffer.reap(
                max_wait_ms=-1,
                batch_size=opts.batch_size,
                lease_ms=opts.lease_ms,
                reason="manual",
                leases=False,
            )
        except _UNREACHABLE as exc:
            self._unavailable(state, exc)
        publish(state.app, self.name, opts.level.value, self.batch_name, claims, "manual")
        return AddResult(0, tuple(c.batch_id for c in claims))


def publish(
    app: Any, task_name: str, queue: str, batch_name: str, claims: list[Claimed], reason: str | None
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
