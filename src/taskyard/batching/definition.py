"""A batch definition: its options, resolved per app, and the producer calls of its API.

``state(app)`` binds the definition to an app (a :class:`~taskyard.batching.producer.BatchProducer`,
one per app); ``.delay``, ``.add_many`` and ``.flush`` go through it, and ``.buffered()`` puts the
process's buffered producer in front of it. The ``@batch_task`` decorator
(:mod:`taskyard.batching.decorator`) builds a definition and binds its flush task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from taskyard.batching.buffered import BufferedProducer, existing_producer, producer_for
from taskyard.batching.producer import AddResult, BatchOptions, BatchProducer
from taskyard.config import Settings
from taskyard.errors import BatchBufferFull, ConfigurationError
from taskyard.routing.levels import Priority
from taskyard.runtime import TaskyardApp, current_taskyard_app, runtime_of

__all__ = ["AddResult", "BatchDefinition", "BatchOptions", "check_number"]


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


class BatchDefinition:
    """A function fed with batches of items, with its options and producer calls.

    ``.delay(item)`` and ``.add_many(items)`` buffer items; calling the object calls the
    function directly with a list. ``.task`` (the Celery task that processes one batch) is bound
    by :func:`taskyard.batching.decorator.batch_task`.
    """

    #: The flush task: a Celery task, typed Any as Celery ships no type information.
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
        app: TaskyardApp | None = None,
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
        self._states: dict[int, BatchProducer] = {}
        self._last: BatchProducer | None = None

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

    def state(self, app: TaskyardApp | None = None) -> BatchProducer:
        """This batch bound to ``app``: its runtime, buffer, options and producer calls.

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
            state = BatchProducer(
                app,
                runtime,
                self.options(runtime.settings),
                task_name=self.name,
                batch_name=self.batch_name,
                key=self.key,
            )
            self._states[id(app)] = state
        self._last = state
        return state

    # --- producers --------------------------------------------------------------------------
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
        return self.state().add(item)

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
        chunks = state.group(items)
        if not chunks or not chunks[0].entries:
            return AddResult(0, ())
        done = state.append_chunks(chunks)
        if done.refused:
            raise BatchBufferFull(
                self.batch_name,
                done.pending,
                state.options.max_buffered,
                accepted=done.accepted,
                rejected=tuple(sorted(done.refused)),
            )
        return AddResult(done.accepted, tuple(c.batch_id for c in done.claims))

    def buffered(
        self, app: TaskyardApp | None = None, *, linger_ms: float | None = None
    ) -> BufferedProducer:
        """This process's buffered producer of this batch: ``.delay`` without a round trip per
        item, durable after its ``flush()`` (see :mod:`taskyard.batching.buffered`)."""
        return producer_for(self.state(app), self.linger_ms if linger_ms is None else linger_ms)

    def flush(self) -> AddResult:
        """Claim every buffered item now, whatever its age (reason "manual")."""
        state = self.state()
        producer = existing_producer(state)
        if producer is not None:  # this process's held items first
            producer.flush()
        claims = state.claim_all("manual")
        return AddResult(0, tuple(c.batch_id for c in claims))
