"""Signal receivers recording terminal failures and expired tasks, and the install call."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from taskyard.deadletters.consumer import DeadLetterGate
from taskyard.deadletters.recorder import Recorder
from taskyard.deadletters.upkeep import install_upkeep
from taskyard.runtime import Runtime

log = logging.getLogger(__name__)


def _is_batch_flush(task: Any) -> bool:
    # A batch's dead letters live with the batch (batching/inspect.py), items and all.
    return getattr(task, "taskyard_batch", None) is not None


class _Receivers:
    """Receivers bound to one app."""

    def __init__(self, app: Celery, recorder: Recorder) -> None:
        self.app = app
        self.recorder = recorder

    def failed(
        self,
        sender: Any = None,
        task_id: str | None = None,
        exception: BaseException | None = None,
        args: Any = None,
        kwargs: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        """task_failure: the task failed for good (no retry left, or none asked for)."""
        try:
            task = sender
            if (
                task is None
                or task_id is None
                or getattr(task, "app", None) is not self.app
                or _is_batch_flush(task)
            ):
                return
            request = task.request
            # A child lost under a task that is not requeued (acks_late off) also ends here.
            reason = "crashed" if type(exception).__name__ == "WorkerLostError" else "failed"
            entry = self.recorder.from_request(
                reason,
                task.name,
                task_id,
                request,
                args,
                kwargs,
                **self.recorder.exception(exception, getattr(einfo, "traceback", None)),
            )
            if getattr(request, "delivery_info", None) and request.delivery_info.get("redelivered"):
                entry.deliveries = self._deliveries(task_id)
            self.recorder.record(entry)
        except Exception:
            log.warning("taskyard dead letters: task_failure hook failed", exc_info=True)

    def revoked(
        self, sender: Any = None, request: Any = None, expired: bool = False, **_: Any
    ) -> None:
        """task_revoked: only an expired task is a dead letter (a revoke is an operator's)."""
        try:
            task = sender
            if (
                not expired
                or task is None
                or request is None
                or getattr(task, "app", None) is not self.app
                or _is_batch_flush(task)
            ):
                return
            entry = self.recorder.from_request(
                "expired",
                task.name,
                request.id,
                request,
                request.args,
                request.kwargs,
                exception_type="TaskExpired",
                exception=f"expired at {getattr(request, 'expires', None)} before it ran",
            )
            self.recorder.record(entry)
        except Exception:
            log.warning("taskyard dead letters: task_revoked hook failed", exc_info=True)

    def _deliveries(self, task_id: str) -> int:
        runtime = self.recorder.runtime
        try:
            value = runtime.redis.get(runtime.keys.deliveries(task_id))
        except Exception:
            return 2
        return int(value or 1) + 1


def install(app: Celery, runtime: Runtime) -> None:
    """Connect the receivers, add the consumer gate and the workers' upkeep for ``app`` (no
    I/O)."""
    recorder = Recorder(runtime)
    receivers = _Receivers(app, recorder)
    settings = runtime.settings.dead_letters
    uid = f"taskyard.deadletters.{id(app)}"
    if settings.record_failures:
        signals.task_failure.connect(receivers.failed, weak=False, dispatch_uid=uid + ".failed")
    if settings.record_expired:
        signals.task_revoked.connect(receivers.revoked, weak=False, dispatch_uid=uid + ".revoked")
    app.steps["consumer"].add(DeadLetterGate)
    install_upkeep(app, runtime)
    app._taskyard_dead_letters = recorder
