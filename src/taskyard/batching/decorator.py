"""``@batch_task``: buffer small items in Redis and hand them to one task as a list."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, overload

from taskyard.batching.definition import BatchDefinition, check_number
from taskyard.batching.flush import make_flush_task
from taskyard.errors import ConfigurationError
from taskyard.flow.options import take_flow_options
from taskyard.routing.levels import Priority, parse_level
from taskyard.routing.options import check_options
from taskyard.routing.task import TaskyardTask
from taskyard.runtime import TaskyardApp

_BATCH_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
#: taskyard's own options of @batch_task (beside Celery's task options for the flush task).
OWN_OPTIONS = (
    "batch_name",
    "batch_size",
    "max_wait",
    "priority",
    "key",
    "max_buffered",
    "max_item_bytes",
    "lease_s",
    "max_retries",
    "retry_backoff_s",
    "max_deliveries",
    "app",
    "linger_ms",
)
_REFUSED = {
    "bind": "the flush task is bound already; the function receives the list of items",
    "base": "the flush task uses its app's task class",
}


class BatchTask(BatchDefinition):
    """What ``@batch_task`` returns: a batch definition bound to its Celery flush task."""

    def __init__(
        self,
        fn: Callable[[list[Any]], Any],
        *,
        celery_options: dict[str, Any],
        app: TaskyardApp | None = None,
        **definition: Any,
    ) -> None:
        options = dict(celery_options)
        super().__init__(fn, name=options.pop("name", None), app=app, **definition)
        self.task = make_flush_task(self, options, app=app)


@overload
def batch_task(fn: Callable[[list[Any]], Any], /) -> BatchTask: ...


@overload
def batch_task(
    *,
    batch_name: str | None = ...,
    batch_size: int = ...,
    max_wait: float = ...,
    priority: str | Priority = ...,
    key: Callable[[Any], Any] | None = ...,
    max_buffered: int | None = ...,
    max_item_bytes: int | None = ...,
    lease_s: float | None = ...,
    max_retries: int | None = ...,
    retry_backoff_s: float | None = ...,
    max_deliveries: int | None = ...,
    app: TaskyardApp | None = ...,
    linger_ms: float | None = ...,
    **celery_options: Any,
) -> Callable[[Callable[[list[Any]], Any]], BatchTask]: ...


def batch_task(
    fn: Any = None,
    /,
    *,
    batch_name: str | None = None,
    batch_size: int = 100,
    max_wait: float = 2.0,
    priority: str | Priority = Priority.BATCH,
    key: Callable[[Any], Any] | None = None,
    max_buffered: int | None = None,
    max_item_bytes: int | None = None,
    lease_s: float | None = None,
    max_retries: int | None = None,
    retry_backoff_s: float | None = None,
    max_deliveries: int | None = None,
    app: TaskyardApp | None = None,
    linger_ms: float | None = None,
    **celery_options: Any,
) -> Any:
    """Make ``fn(items: list)`` a batch task fed by ``.delay(item)`` and ``.add_many(items)``.

    Works bare (``@batch_task``: batch name = function name, 100 items, 2 s) or called. Options
    left None take the app's ``TASKYARD_BATCH__*`` setting. Every option is checked here, when
    the module is imported.

    Args:
        batch_name: buffers of this name hold the items (default: the function's name).
        batch_size: a batch is flushed as soon as it has this many items.
        max_wait: ...or at the latest this many seconds after its oldest item arrived.
        priority: level whose queue carries the flush tasks (default "batch").
        key: ``key(item) -> str`` gives each key its own buffer under the same batch name.
        max_buffered: accepted, unfinished items the batch name may hold.
        max_item_bytes: largest encoded item.
        lease_s: a batch whose worker stops renewing its lease is republished after this.
        max_retries, retry_backoff_s: retries of a failing batch (delay doubles each time)
            before it goes to the dead letters.
        max_deliveries: runs that killed their process (segfault, OOM killer) before the batch
            goes to the dead letters as "crashed" (default ``TASKYARD_MAX_DELIVERIES``).
        app: the taskyard app of this batch; default: the current taskyard app at each call.
        linger_ms: opt-in buffered producer: ``.delay`` checks and encodes the item, and a
            background thread appends every ``linger_ms``; durable once ``.buffered().flush()``
            returns (see :mod:`taskyard.batching.buffered`). None: ``.delay`` is durable on return.

    Flow control of the flush runs (docs/flow.md): ``rate_limit="10/s"`` and ``concurrency=2``
    hold across the cluster; ``partition_by="key"`` applies them per batch key, with fair share
    between keys.

    Other keywords are Celery's task options for the flush task (``name=``, ``time_limit=``...).

    Raises:
        ConfigurationError: an option is unknown (the message names the closest valid one) or
            out of range (the message names value and range), or ``app`` is not a taskyard app.
        RoutingError: ``priority`` is not one of the five levels.
    """
    level = parse_level(priority)
    # Flow control governs the flush runs: rate_limit= (taskyard's, cluster-wide, not Celery's
    # per-worker bucket), concurrency=, partition_by="key" (per batch key).
    flow_options: dict[str, Any] = {
        name: celery_options.pop(name)
        for name in ("rate_limit", "concurrency", "partition_by")
        if name in celery_options
    }
    partition = flow_options.get("partition_by")
    if partition is not None and partition != "key":
        raise ConfigurationError(
            f'@batch_task: partition_by={partition!r} is not allowed; expected "key" (limits '
            "and fair share per batch key)",
            setting="partition_by",
            value=partition,
        )
    flow = take_flow_options("@batch_task", flow_options)
    if flow is not None:
        celery_options["taskyard_flow"] = flow
    check_options("@batch_task", celery_options, OWN_OPTIONS, _REFUSED)
    check_number(
        "batch_size", batch_size, minimum=1, strict=False, integer=True, allowed="an integer >= 1"
    )
    check_number("max_wait", max_wait, minimum=0, strict=True, allowed="a number of seconds > 0")
    check_number(
        "max_buffered",
        max_buffered,
        minimum=1,
        strict=False,
        integer=True,
        allowed="an integer >= 1",
    )
    check_number(
        "max_item_bytes",
        max_item_bytes,
        minimum=16,
        strict=False,
        integer=True,
        allowed="an integer >= 16",
    )
    check_number("lease_s", lease_s, minimum=0, strict=True, allowed="a number of seconds > 0")
    check_number(
        "max_retries", max_retries, minimum=0, strict=False, integer=True, allowed="an integer >= 0"
    )
    check_number(
        "retry_backoff_s",
        retry_backoff_s,
        minimum=0,
        strict=False,
        allowed="a number of seconds >= 0",
    )
    check_number(
        "max_deliveries",
        max_deliveries,
        minimum=1,
        strict=False,
        integer=True,
        allowed="an integer >= 1",
    )
    check_number(
        "linger_ms",
        linger_ms,
        minimum=0,
        strict=False,
        allowed="a number of milliseconds >= 0 (or None: no buffering)",
    )
    if linger_ms is not None and linger_ms > 10_000:
        raise ConfigurationError(
            f"linger_ms={linger_ms!r} is not allowed; expected at most 10000 ms (items wait in "
            "the process, lost on a crash, for that long)",
            setting="linger_ms",
            value=linger_ms,
        )
    if max_buffered is not None and max_buffered < batch_size:
        raise ConfigurationError(
            f"max_buffered={max_buffered} is smaller than batch_size={batch_size}; a batch "
            "could never fill",
            setting="max_buffered",
            value=max_buffered,
        )
    if batch_name is not None and (
        not isinstance(batch_name, str) or not _BATCH_NAME.match(batch_name)
    ):
        raise ConfigurationError(
            f"batch_name={batch_name!r} is not allowed; expected 1-200 characters among "
            "letters, digits and _ . : -",
            setting="batch_name",
            value=batch_name,
        )
    if key is not None and not callable(key):
        raise ConfigurationError(
            f"key={key!r} is not callable; expected a function of the item",
            setting="key",
            value=key,
        )

    def decorate(target: Any) -> BatchTask:
        if isinstance(target, BatchTask | TaskyardTask) or not callable(target):
            raise ConfigurationError(
                f"@batch_task decorates a plain function, not {type(target).__name__}", value=target
            )
        name = batch_name or target.__name__
        if not _BATCH_NAME.match(name):
            raise ConfigurationError(
                f"batch name {name!r} (from the function) is not allowed; pass batch_name=",
                setting="batch_name",
                value=name,
            )
        return BatchTask(
            target,
            batch_name=name,
            batch_size=batch_size,
            max_wait=max_wait,
            level=level,
            key=key,
            max_buffered=max_buffered,
            max_item_bytes=max_item_bytes,
            lease_s=lease_s,
            max_retries=max_retries,
            retry_backoff_s=retry_backoff_s,
            max_deliveries=max_deliveries,
            celery_options=dict(celery_options),
            app=app,
            linger_ms=linger_ms,
        )

    if fn is not None:
        return decorate(fn)
    return decorate
