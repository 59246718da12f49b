"""The worker side: the Celery task that processes one batch.

It takes the batch under a lease (renewed while the function runs), calls the function with the
items, and then finishes the batch, retries it (whole, or only the items a
:class:`~taskyard.errors.PartialFailure` names) with exponential backoff, or moves it to the dead
letters after ``max_retries``. Deliveries are at least once: a batch whose worker died is
republished by the reaper and counted as a duplicate when it runs again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

from taskyard import serialization
from taskyard.batching.buffer import Acquired, BatchBuffer
from taskyard.errors import PartialFailure
from taskyard.routing.binding import bind_task
from taskyard.runtime import TaskyardApp

if TYPE_CHECKING:
    from taskyard.batching.definition import BatchDefinition
    from taskyard.batching.producer import BatchOptions

log = logging.getLogger(__name__)

#: Longest error text kept with a failed batch.
_ERROR_CHARS = 2000


#: Class attributes of every flush task. A killed worker's batch must run again: acknowledge
#: after the function, and requeue when the pool child is lost (the lease covers a lost worker
#: as well).
FLUSH_TASK_OPTIONS: dict[str, Any] = {"acks_late": True, "reject_on_worker_lost": True}


def make_flush_task(
    batch: BatchDefinition, celery_options: dict[str, Any], *, app: TaskyardApp | None = None
) -> Any:
    """The Celery task that runs ``batch``: of ``app``, or of every taskyard app.

    The task is of the app's own task class, like any other taskyard task, and carries the
    definition it serves as ``taskyard_batch``.
    """

    def flush_batch(self: Any, batch_id: str) -> dict[str, Any]:
        return run_batch(self, self.taskyard_batch, str(batch_id))

    flush_batch.__doc__ = f"Process one batch of {batch.batch_name!r}: calls {batch.name}."
    options = {**FLUSH_TASK_OPTIONS, **celery_options}
    return bind_task(
        flush_batch,
        app=app,
        decorator="@batch_task",
        name=batch.name,
        bind=True,
        taskyard_level=batch.level,
        taskyard_batch=batch,
        **options,
    )


class LeaseKeeper:
    """Renews a batch's lease every third of it while the function runs (a daemon thread).

    A worker that dies stops renewing, so the lease bounds the recovery time of a crash rather
    than the running time of a batch.
    """

    def __init__(self, buffer: BatchBuffer, batch_id: str, token: str, lease_ms: int) -> None:
        self.buffer = buffer
        self.batch_id = batch_id
        self.token = token
        self.lease_ms = lease_ms
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"taskyard-lease-{batch_id}"
        )

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = self.lease_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self.buffer.renew(self.batch_id, self.token, self.lease_ms):
                    return
            except Exception as exc:  # Redis briefly away: try again next interval
                log.warning("batch lease %s not renewed: %s", self.batch_id, exc)


def _valid_indices(
    failure: PartialFailure, size: int, batch: BatchDefinition, batch_id: str
) -> list[int] | None:
    indices = [i for i in failure.failed if 0 <= i < size]
    if len(indices) != len(failure.failed):
        log.warning(
            "batch %s/%s: PartialFailure names indices outside 0..%d: %s",
            batch.batch_name,
            batch_id,
            size - 1,
            sorted(set(failure.failed) - set(indices)),
        )
    return indices or None


def run_batch(task: Any, batch: BatchDefinition, batch_id: str) -> dict[str, Any]:
    """Process batch ``batch_id`` of ``batch`` inside the flush task ``task``."""
    state = batch.state(task.app)
    opts, buffer = state.options, state.buffer
    token = task.request.id or uuid.uuid4().hex
    got = buffer.acquire(batch_id, token, opts.lease_ms, opts.max_deliveries)
    if got.status == "crashed":
        # Its earlier runs killed their process max_deliveries times: dead letters, not a loop.
        log.error(
            "batch %s/%s: %d runs ended with their process dead; moved to the dead "
            "letters (crashed)",
            batch.batch_name,
            batch_id,
            got.deliveries,
        )
        return {"batch_id": batch_id, "status": "crashed"}
    if got.status != "ok":
        # "gone": already finished (a duplicate message); "busy": another live worker holds it;
        # "dead": in the dead letters. Nothing to do, and nothing to retry.
        log.info("batch %s/%s not processed here: %s", batch.batch_name, batch_id, got.status)
        return {"batch_id": batch_id, "status": got.status}
    items = [serialization.loads(entry) for entry in got.entries]
    outcome: Any
    with LeaseKeeper(buffer, batch_id, token, opts.lease_ms):
        try:
            outcome = batch.fn(items)
        except PartialFailure as exc:
            outcome = exc
        except Exception as exc:
            return _failed(task, batch, buffer, opts, got, batch_id, token, exc, None)
    if isinstance(outcome, PartialFailure) and outcome.failed:
        # Indices all out of range are a bug of the function: retry the whole batch.
        indices = _valid_indices(outcome, len(items), batch, batch_id)
        return _failed(task, batch, buffer, opts, got, batch_id, token, outcome, indices)
    buffer.complete(batch_id)
    return {
        "batch_id": batch_id,
        "status": "done",
        "size": len(items),
        "group": got.group,
        "duplicate": got.duplicate,
    }


def _failed(
    task: Any,
    batch: BatchDefinition,
    buffer: BatchBuffer,
    opts: BatchOptions,
    got: Acquired,
    batch_id: str,
    token: str,
    exc: BaseException,
    indices: list[int] | None,
) -> dict[str, Any]:
    backoff_s = opts.retry_backoff_s * (2**got.attempts)
    result = buffer.fail(
        batch_id,
        token,
        max_retries=opts.max_retries,
        backoff_ms=int(backoff_s * 1000),
        lease_ms=opts.lease_ms,
        error=f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS],
        failed=indices,
    )
    if result.status == "retry":
        log.warning(
            "batch %s/%s: %d items failed (attempt %d of %d), retry in %.1f s: %r",
            batch.batch_name,
            batch_id,
            result.failed,
            result.attempts,
            opts.max_retries + 1,
            backoff_s,
            exc,
        )
        # Same task id: a redelivery of the retry message is recognised by the lease owner.
        raise task.retry(
            args=[batch_id],
            countdown=backoff_s,
            max_retries=None,
            exc=exc if isinstance(exc, Exception) else None,
        )
    if result.status == "dead":
        log.error(
            "batch %s/%s: %d items moved to the dead letters after %d attempts: %r",
            batch.batch_name,
            batch_id,
            result.failed,
            result.attempts,
            exc,
        )
        raise exc
    # "gone"/"lost": another worker took the batch over after our lease ran out; it decides.
    return {"batch_id": batch_id, "status": result.status}
