"""What an app's tasks, its CLI and its API call for job control: :class:`JobControl`.

``create_app`` installs one per app (``runtime.jobs``); the task class (which
may not import the broker) reaches it there. It owns the app's :class:`CancelStore`, the progress
reports, the pre-run cancel check, the durable ``app.control.revoke`` and the worker's cancel
watcher (a consumer bootstep).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from celery import bootsteps, signals
from celery.exceptions import Ignore

from taskyard.broker.control.bulk import send_many
from taskyard.broker.control.jobs import CancelStore, Found
from taskyard.outage import Outage
from taskyard.runtime import Runtime, find_runtime, redis_client
from taskyard.seams import Seam

logger = logging.getLogger(__name__)

# What the cancel watcher relies on in Celery's worker: its revoked set (checked when a message
# arrives and again before the pool runs it), the requests running now, and terminating one.
SEAMS = (
    Seam("celery.worker.state", "revoked", "attribute"),
    Seam("celery.worker.state", "active_requests", "attribute"),
    Seam("celery.worker.request.Request", "terminate", params=("pool", "signal")),
    Seam("celery.app.control.Control", "revoke", params=("task_id", "destination", "terminate")),
)

#: A task's cancel_requested() reads Redis at most this often (s); between reads the last
#: answer stands.
CANCEL_CHECK_INTERVAL_S = 0.1
#: The pre-run check reads the size of the cancel set at most this often per process (s), and
#: looks a task up only when the set is non-empty.
PRERUN_COUNT_INTERVAL_S = 0.5
#: How far (s) the cancel watcher reads back before the newest record it saw (clock skew
#: between the hosts that cancel).
CLOCK_SLACK_S = 30.0


class JobControl:
    """Cancel records, progress reports and cancel checks of one app."""

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = runtime.settings.jobs
        self._lock = threading.Lock()
        self._store: tuple[int, CancelStore] | None = None
        #: task id -> (last write, monotonic; pending report or None), per process.
        self._progress: dict[str, tuple[float, dict[str, Any] | None]] = {}
        #: task id -> (checked at, answer) of cancel_requested().
        self._checked: dict[str, tuple[float, bool]] = {}
        self._count_at = (float("-inf"), 0)

    # --- the broker's Redis -----------------------------------------------------------------
    @property
    def store(self) -> CancelStore:
        """The cancel records (a client per process: prefork children get their own)."""
        held = self._store
        if held is not None and held[0] == os.getpid():
            return held[1]
        with self._lock:
            options = self.app.conf.broker_transport_options or {}
            client = redis_client(
                self.app.conf.broker_url,
                socket_connect_timeout=self.runtime.settings.broker_connect_timeout_s,
            )
            store = CancelStore(
                client,
                self.runtime.keys,
                str(options.get("global_keyprefix") or ""),
                self.settings.cancel_retention_s,
            )
            self._store = (os.getpid(), store)
            return store

    @property
    def client(self) -> redis.Redis:
        return self.store.client

    # --- cancelling ---------------------------------------------------------------------------
    def cancel(
        self, task_ids: list[str], *, by: str, terminate: bool = False, grace_s: float | None = None
    ) -> int:
        """Cancel ``task_ids`` wherever they are; returns how many were new records."""
        grace = self.settings.terminate_grace_s if grace_s is None else grace_s
        return self.store.cancel(task_ids, by=by, terminate=terminate, grace_s=grace)

    def find(
        self, name: str = "*", queue: str | None = None, older_than_s: float | None = None
    ) -> list[Found]:
        """Messages of the app's queues (queued, delayed, reserved) matching a filter."""
        options = self.app.conf.broker_transport_options or {}
        sep = str(options.get("sep", "\x06\x16"))
        steps = list(options.get("priority_steps", [0, 3, 6, 9]))
        queues = list(self.app.amqp.queues.keys())
        # kombu's Channel._q_for_pri: step 0 is the queue's own name.
        names = {q: [q if not s else f"{q}{sep}{s}" for s in steps] for q in queues}
        return self.store.find(queues, names, name=name, queue=queue, older_than_s=older_than_s)

    def cancel_requested(self, task_id: str | None) -> bool:
        """Whether ``task_id`` was cancelled (read at most every 0.1 s per task)."""
        if not task_id:
            return False
        now = time.monotonic()
        checked = self._checked.get(task_id)
        if checked is not None and (checked[1] or now - checked[0] < CANCEL_CHECK_INTERVAL_S):
            return checked[1]
        answer = self.store.is_cancelled(task_id)
        if len(self._checked) > 10_000:
            self._checked.clear()
        self._checked[task_id] = (now, answer)
        return answer

    def check_before_run(self, task: Any) -> None:
        """Skip a cancelled task just before it runs (a message reserved before the cancel).

        Raises:
            celery.exceptions.Ignore: the task was cancelled; it is neither retried nor failed.
        """
        request = task.request
        task_id = getattr(request, "id", None)
        if not task_id or getattr(request, "is_eager", False):
            return
        now = time.monotonic()
        at, count = self._count_at
        if now - at >= PRERUN_COUNT_INTERVAL_S:
            try:
                count = self.store.count()
            except redis.RedisError:
                logger.warning("could not read the cancel records", exc_info=True)
                return
            self._count_at = (now, count)
        if count and self.cancel_requested(task_id):
            self.store.set_outcome(task_id, "skipped")
            raise Ignore()

    # --- bulk enqueue -------------------------------------------------------------------------
    def send_many(
        self,
        task: Any,
        calls: Iterable[tuple[Any, Any]],
        queue: str | None,
        lock_for: Callable[[Any, Any], list[Any] | None],
    ) -> list[str]:
        """``apply_many``: pipelined when the fast path serves ``task``, else one by one."""
        publisher = self.runtime.publisher
        if publisher is not None:
            ids = send_many(publisher, task, calls, queue, lock_for, self.settings.bulk_chunk)
            if ids is not None:
                return ids
        options = {"queue": queue, "routing_key": queue} if queue else {}
        return [task.apply_async(args, kwargs, **options).id for args, kwargs in calls]

    # --- progress -----------------------------------------------------------------------------
    def progress(
        self, task: Any, done: float, total: float | None = None, detail: str | None = None
    ) -> bool:
        """Report a running task's progress; returns True when written now (else kept as the
        pending report, written by the next report due or when the task returns)."""
        request = task.request
        task_id = getattr(request, "id", None)
        if not task_id:
            return False
        report = {"done": done, "total": total, "detail": detail, "at": time.time()}
        now = time.monotonic()
        last = self._progress.get(task_id)
        if last is not None and now - last[0] < self.settings.progress_interval_s:
            self._progress[task_id] = (last[0], report)
            return False
        self._progress[task_id] = (now, None)
        self._write_progress(task, task_id, report)
        return True

    def flush_progress(self, task: Any, task_id: str) -> None:
        """Write the pending report of a finished task (the last one always lands)."""
        held = self._progress.pop(task_id, None)
        if held is not None and held[1] is not None:
            self._write_progress(task, task_id, held[1])

    def read_progress(self, task_id: str) -> dict[str, Any] | None:
        raw = self.runtime.redis.get(self.runtime.keys.progress(task_id))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _write_progress(self, task: Any, task_id: str, report: dict[str, Any]) -> None:
        try:
            self.runtime.redis.set(
                self.runtime.keys.progress(task_id),
                json.dumps(report),
                ex=max(1, int(self.settings.progress_ttl_s)),
            )
        except redis.RedisError:
            logger.warning("could not write the progress of %s", task_id, exc_info=True)
        if self.app.conf.worker_send_task_events and not getattr(task.request, "is_eager", False):
            try:
                # A custom event type: Flower lists it among the task's events.
                task.send_event("task-progress", **report)
            except Exception:
                logger.warning("could not send the progress event of %s", task_id, exc_info=True)


def control_of(app: Any, runtime: Runtime) -> JobControl:
    control = runtime.jobs
    if not isinstance(control, JobControl):
        control = runtime.jobs = JobControl(app, runtime)
    return control


# --- the worker's cancel watcher ----------------------------------------------------------------
class CancelWatcher(bootsteps.StartStopStep):  # type: ignore[misc]
    """Reads new cancel records every ``jobs.cancel_poll_s`` in the worker's main process.

    Each cancelled id goes into Celery's own revoked set (``celery.worker.state.revoked``, which
    the worker checks when a message arrives and again before handing it to the pool), so a
    message this worker reserved before the cancel never starts: Celery acknowledges it, marks
    it revoked and sends task-revoked. A record with ``terminate`` ends a running prefork task
    after its grace period through Celery's ``Request.terminate`` (the child is killed and the
    pool replaces it). On the solo and thread pools a running task cannot be killed without the
    worker: it runs on until it checks ``cancel_requested()``.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self, c: Any) -> None:
        runtime = find_runtime(c.app)
        if runtime is None or not str(c.app.conf.broker_url or "").startswith(
            ("redis", "rediss", "sentinel")
        ):
            return
        control = control_of(c.app, runtime)
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self.watch, args=(c, control), name="taskyard-cancel-watcher", daemon=True
        )
        self._thread.start()

    def stop(self, c: Any) -> None:
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None

    shutdown = stop

    def watch(self, c: Any, control: JobControl) -> None:
        from celery.worker import state

        after = time.time() - control.settings.cancel_retention_s
        pending: dict[str, float] = {}  # task id -> when to terminate it
        #: Records already handled in the overlap window: a record's score is the canceller's
        #: clock, so each poll reads back CLOCK_SLACK_S before the newest score seen and a
        #: canceller whose clock lags by less than that is not missed.
        seen: dict[str, float] = {}
        outage = Outage(logger, "reading new cancel records")
        while not self._stopped.wait(control.settings.cancel_poll_s):
            try:
                for task_id, at in control.store.since(after - CLOCK_SLACK_S):
                    if task_id in seen and seen[task_id] >= at:
                        continue
                    seen[task_id] = at
                    after = max(after, at)
                    state.revoked.add(task_id)
                    record = control.store.record(task_id) or {}
                    if record.get("terminate"):
                        pending[task_id] = time.monotonic() + float(record.get("grace_s") or 0)
            except redis.RedisError as exc:
                outage.failed(exc)
                continue
            outage.ok()
            if len(seen) > 10_000:
                seen = {k: v for k, v in seen.items() if v >= after - CLOCK_SLACK_S}
            if pending:
                self.terminate_due(c, control, pending)

    def terminate_due(self, c: Any, control: JobControl, pending: dict[str, float]) -> None:
        from celery.worker import state

        now = time.monotonic()
        active = {request.id: request for request in list(state.active_requests)}
        for task_id, due in list(pending.items()):
            request = active.get(task_id)
            if request is None:
                if now >= due:
                    pending.pop(task_id)  # finished (or never here)
                continue
            if now < due:
                continue
            pending.pop(task_id)
            pool = getattr(c, "pool", None)
            if pool is None or not _can_terminate(pool):
                logger.warning(
                    "task %s was cancelled with terminate but runs on a %s pool, which cannot "
                    "kill one task; it runs until it checks cancel_requested()",
                    task_id,
                    type(pool).__name__,
                )
                continue
            logger.warning("terminating cancelled task %s after its grace period", task_id)
            try:
                control.store.set_outcome(task_id, "terminated")
                request.terminate(pool, signal="SIGKILL")
            except Exception:
                logger.warning("could not terminate task %s", task_id, exc_info=True)


def _can_terminate(pool: Any) -> bool:
    # celery.concurrency.prefork.TaskPool kills a child by pid; solo/threads would kill the
    # whole worker or cannot kill at all.
    return type(pool).__module__.endswith("prefork")


# --- durable revoke ---------------------------------------------------------------------------
def _durable_revoke(app: Any, control: JobControl) -> None:
    """Make ``app.control.revoke`` (and so ``AsyncResult.revoke``) write the cancel record."""
    celery_control = app.control
    original = celery_control.revoke

    def revoke(
        task_id: Any, destination: Any = None, terminate: bool = False, **kwargs: Any
    ) -> Any:
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        try:
            control.cancel(ids, by="celery revoke", terminate=bool(terminate))
        except redis.RedisError:
            logger.warning("could not record the revoke of %s durably", ids, exc_info=True)
        # Celery's broadcast too: workers of other apps, and Celery's own terminate signal.
        return original(task_id, destination=destination, terminate=terminate, **kwargs)

    revoke.__doc__ = original.__doc__
    celery_control.revoke = revoke


def install(app: Any, runtime: Runtime) -> None:
    """Job control of ``app``: the control object, durable revoke, the watcher, progress flush."""
    if not str(app.conf.broker_url or "").startswith(("redis", "rediss", "sentinel")):
        # Cancel records, unique locks and progress live in the broker's Redis: on RabbitMQ the
        # app keeps Celery's own behaviour (docs/jobs.md), and runtime.jobs stays None.
        return
    control = control_of(app, runtime)
    _durable_revoke(app, control)
    app.steps["consumer"].add(CancelWatcher)

    def flush(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if not task_id or sender is None or find_runtime(sender.app) is not runtime:
            return
        control.flush_progress(sender, task_id)
        seen = control._checked.pop(task_id, None)
        if seen is not None and seen[1]:
            # The task saw its cancel and returned: it stopped by itself.
            try:
                control.store.set_outcome(task_id, "stopped")
            except redis.RedisError:
                logger.warning("could not record that %s stopped", task_id, exc_info=True)

    def revoked(
        sender: Any = None, request: Any = None, terminated: bool = False, **_: Any
    ) -> None:
        # Celery skipped (or terminated) a message it held when the cancel arrived.
        task_id = getattr(request, "id", None)
        if not task_id or sender is None or find_runtime(sender.app) is not runtime:
            return
        try:
            record = control.store.record(task_id)
            if record is not None and not record.get("outcome"):
                control.store.set_outcome(task_id, "terminated" if terminated else "skipped")
        except redis.RedisError:
            logger.warning("could not record the outcome of %s", task_id, exc_info=True)

    uid = f"taskyard.jobs.{id(app)}"
    signals.task_postrun.connect(flush, weak=False, dispatch_uid=uid + ".postrun")
    signals.task_revoked.connect(revoked, weak=False, dispatch_uid=uid + ".revoked")
