"""Per-task metrics captured from Celery signals, buffered in process, flushed to Redis in batches.

Counters (received, started, succeeded, failed, retried, deferred) and histograms (runtime,
queue wait = sent -> started) are kept per task name and queue in plain dicts; a daemon thread
writes them every ``flush_interval_s`` with one pipelined round trip of HINCRBY/HINCRBYFLOAT, so
no task waits on Redis. Increments are additive, so every prefork child (and the parent, which
sees ``task_received``) flushes its own buffer; each process starts its own flusher on first use
after a fork and flushes once more at exit (``worker_process_shutdown`` / ``worker_shutdown``).
A failing hook is logged and never reaches the task; a failing flush keeps the counts for the
next one.

The sent time travels in the ``taskyard_sent_at`` message header, set by ``before_task_publish``;
a message with an ETA counts its wait from the ETA.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import math
import os
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any

from celery import signals
from celery._state import get_current_app, get_current_worker_task

from taskyard import signals as taskyard_signals
from taskyard.monitoring import timeline
from taskyard.outage import Outage
from taskyard.runtime import Runtime, TaskyardApp, find_runtime, sending_app
from taskyard.seams import Seam

# Celery internals (a private module) this module reads (checked by tests/test_seams.py).
SEAMS = (
    Seam("celery._state", "get_current_app"),
    Seam("celery._state", "get_current_worker_task"),
)

logger = logging.getLogger(__name__)

#: Upper bounds (s) of the runtime and wait histogram buckets (Prometheus' defaults widened to
#: a minute, since batch and report tasks run long); one more bucket holds everything above.
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Bucket labels as stored in Redis: each bound's text, then "+Inf".
BUCKET_LABELS: tuple[str, ...] = (*(repr(b) for b in BUCKETS), "+Inf")
#: Counter events, in the order they are reported.
EVENTS: tuple[str, ...] = ("received", "started", "succeeded", "failed", "retried", "deferred")
#: Histogram kinds.
KINDS: tuple[str, ...] = ("runtime", "wait")
#: Separator of the parts of a stats field name ("<task>\x1f<queue>\x1f<event or bucket>").
SEP = "\x1f"
#: Message header carrying the time (s since epoch) the task was sent.
SENT_HEADER = "taskyard_sent_at"

#: The timeline step and counter of a run's final state (none for ignored or rejected runs).
STATE_EVENT = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}
#: Timeline events one process holds at most between flushes; beyond this the oldest are dropped
#: (timelines are best-effort, like Celery's events).
MAX_TIMELINE_EVENTS = 100_000
#: A received request with this attribute true is recorded by its handler (the lean path's
#: LeanRequest, which cannot import this module), not by the task_received receiver.
CAPTURED_ATTR = "taskyard_captured"
# Attributes the capture keeps on the task's request between prerun and postrun.
_KEY_ATTR = "_taskyard_capture_key"
_START_ATTR = "_taskyard_capture_start"


def bucket_index(value: float) -> int:
    """Index of the bucket ``value`` falls in (``len(BUCKETS)`` for the overflow bucket)."""
    return bisect.bisect_left(BUCKETS, value)


class Capture:
    """In-process metric buffer of one app, with its background flusher."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.keys = runtime.keys
        self.interval_s = runtime.settings.monitoring.flush_interval_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._hist: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
        self._sums: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
        # Packed timeline events; deque appends and pops are atomic, so no lock is taken.
        self._events: deque[str] = deque(maxlen=MAX_TIMELINE_EVENTS)
        self._start_lock = threading.Lock()
        self._pid = -1
        self._running = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._outage = Outage(logger, "taskyard capture: writing task metrics")
        #: The task id a lean handler records itself (run_started .. run_finished).
        self.direct: str | None = None
        os.register_at_fork(after_in_child=self._after_fork)

    # --- recording (hot path: dict updates under a lock, no I/O) -------------------------------
    def _ensure_flusher(self) -> None:
        if self._running:
            return
        with self._start_lock:
            if self._running:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, name="taskyard-capture-flush", daemon=True
            )
            self._thread.start()
            self._pid = os.getpid()
            self._running = True

    def _after_fork(self) -> None:
        # A forked child inherits the parent's unflushed buffer (the parent flushes it) and
        # possibly a lock held by the parent's flusher thread: start afresh, flusher included.
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._counts = {}
        self._hist = {kind: {} for kind in KINDS}
        self._sums = {kind: {} for kind in KINDS}
        self._events = deque(maxlen=MAX_TIMELINE_EVENTS)
        self._thread = None
        self._running = False
        self._pid = -1

    def event(
        self,
        task_id: str,
        event: str,
        name: str,
        queue: str,
        worker: str,
        detail: str = "",
        at: float | None = None,
    ) -> None:
        """One step of a task's timeline (no I/O, no lock)."""
        self._ensure_flusher()
        self._events.append(
            timeline.pack(
                task_id, time.time() if at is None else at, event, name, queue, worker, detail
            )
        )

    def count(self, name: str, queue: str, event: str, n: int = 1) -> None:
        """Add ``n`` to one counter."""
        self._ensure_flusher()
        field = f"{name}{SEP}{queue}{SEP}{event}"
        with self._lock:
            self._counts[field] = self._counts.get(field, 0) + n

    def observe(self, name: str, queue: str, kind: str, value: float) -> None:
        """Record one histogram observation (s)."""
        self._ensure_flusher()
        prefix = f"{name}{SEP}{queue}{SEP}"
        field = prefix + BUCKET_LABELS[bucket_index(value)]
        with self._lock:
            hist = self._hist[kind]
            hist[field] = hist.get(field, 0) + 1
            sums = self._sums[kind]
            sums[prefix] = sums.get(prefix, 0.0) + value

    def started(self, name: str, queue: str, wait_s: float | None) -> None:
        """A task started; one lock round for its counter and its wait."""
        self._ensure_flusher()
        prefix = f"{name}{SEP}{queue}{SEP}"
        with self._lock:
            counts = self._counts
            field = prefix + "started"
            counts[field] = counts.get(field, 0) + 1
            if wait_s is not None:
                self._observe("wait", prefix, wait_s)

    def finished(self, name: str, queue: str, event: str | None, runtime_s: float | None) -> None:
        """A task finished with ``event`` (succeeded/failed/retried or None); one lock round."""
        self._ensure_flusher()
        prefix = f"{name}{SEP}{queue}{SEP}"
        with self._lock:
            if event is not None:
                counts = self._counts
                field = prefix + event
                counts[field] = counts.get(field, 0) + 1
            if runtime_s is not None:
                self._observe("runtime", prefix, runtime_s)

    # --- the lean path's direct calls (taskyard.workers.lean) ----------------------------------
    def run_started(
        self,
        task_id: str,
        name: str,
        queue: str,
        worker: str,
        at: float,
        headers: dict[str, Any],
        retries: str,
    ) -> None:
        """A task received and started at once (``at``), as a lean handler runs it: the
        ``received`` and ``started`` counters, its wait (from the message's sent-time header),
        and both timeline steps, in one call. Until :meth:`run_finished`, the signal receivers
        leave this task id alone."""
        self.direct = task_id
        try:
            self._ensure_flusher()
            sent_at = _seconds(headers.get(SENT_HEADER))
            prefix = f"{name}{SEP}{queue}{SEP}"
            with self._lock:
                counts = self._counts
                for step in ("received", "started"):
                    field = prefix + step
                    counts[field] = counts.get(field, 0) + 1
                if sent_at is not None:
                    self._observe("wait", prefix, max(0.0, at - sent_at))
            append = self._events.append
            append(timeline.pack(task_id, at, "received", name, queue, worker))
            append(timeline.pack(task_id, at, "started", name, queue, worker, retries))
        except Exception:
            logger.warning("taskyard capture: recording a started task failed", exc_info=True)

    def run_finished(
        self,
        task_id: str,
        name: str,
        queue: str,
        worker: str,
        state: str | None,
        runtime_s: float,
    ) -> None:
        """The end of a run :meth:`run_started` recorded, in Celery's ``state``
        (``SUCCESS``, ``FAILURE``, ``RETRY``, ...): what ``task_postrun`` records. An ignored or
        rejected run (a guard's deferral) counts no outcome and no runtime."""
        self.direct = None
        try:
            event = STATE_EVENT.get(state or "")
            if event is None:
                return
            self.finished(name, queue, event, runtime_s)
            self._events.append(
                timeline.pack(task_id, time.time(), event, name, queue, worker, f"{runtime_s:.6f}")
            )
        except Exception:
            logger.warning("taskyard capture: recording a finished task failed", exc_info=True)

    def _observe(self, kind: str, prefix: str, value_s: float) -> None:
        """Count ``value_s`` in its bucket of the ``kind`` histogram; the caller holds the lock."""
        hist = self._hist[kind]
        field = prefix + BUCKET_LABELS[bisect.bisect_left(BUCKETS, value_s)]
        hist[field] = hist.get(field, 0) + 1
        sums = self._sums[kind]
        sums[prefix] = sums.get(prefix, 0.0) + value_s

    # --- flushing ----------------------------------------------------------------------------
    def _take(
        self,
    ) -> tuple[dict[str, int], dict[str, dict[str, int]], dict[str, dict[str, float]]]:
        with self._lock:
            taken = self._counts, self._hist, self._sums
            self._counts = {}
            self._hist = {kind: {} for kind in KINDS}
            self._sums = {kind: {} for kind in KINDS}
        return taken

    def _give_back(
        self,
        counts: dict[str, int],
        hist: dict[str, dict[str, int]],
        sums: dict[str, dict[str, float]],
    ) -> None:
        with self._lock:
            for field, n in counts.items():
                self._counts[field] = self._counts.get(field, 0) + n
            for kind in KINDS:
                for field, n in hist[kind].items():
                    self._hist[kind][field] = self._hist[kind].get(field, 0) + n
                for field, s in sums[kind].items():
                    self._sums[kind][field] = self._sums[kind].get(field, 0.0) + s

    def flush(self) -> int:
        """Write the buffer to Redis in one pipelined round trip; returns the fields written.

        A failed write is logged and its counts kept for the next flush.
        """
        counts, hist, sums = self._take()
        events = self._take_events()
        fields = len(counts) + sum(len(h) + len(sums[k]) for k, h in hist.items())
        if not fields and not events:
            return 0
        try:
            with self.runtime.redis.pipeline(transaction=False) as pipe:
                if events:
                    timeline.append(pipe, self.runtime, events)
                counts_key = self.keys.task_counts()
                for field, n in counts.items():
                    pipe.hincrby(counts_key, field, n)
                for kind in KINDS:
                    key = self.keys.task_histogram(kind)
                    for field, n in hist[kind].items():
                        pipe.hincrby(key, field, n)
                    for prefix, total in sums[kind].items():
                        pipe.hincrbyfloat(key, prefix + "sum", total)
                pipe.execute()
        except Exception as exc:
            self._outage.failed(exc, f"{fields} fields and {len(events)} events kept")
            self._give_back(counts, hist, sums)
            self._events.extendleft(reversed(events))
            return 0
        self._outage.ok()
        return fields + len(events)

    def _take_events(self) -> list[str]:
        taken: list[str] = []
        pop = self._events.popleft
        try:
            while True:
                taken.append(pop())
        except IndexError:
            return taken

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        """Flush what is buffered and stop the flusher (at process exit, or when the app
        closes); recording again starts a new one."""
        if self._pid == os.getpid():
            self._stop.set()
            self._running = False
            self.flush()


# --- signal receivers -----------------------------------------------------------------------
def _queue_of(request: Any, default: str) -> str:
    info = getattr(request, "delivery_info", None)
    if info:
        queue = info.get("routing_key") or info.get("queue")
        if queue:
            return str(queue)
    return default


def _seconds(value: Any) -> float | None:
    """A sent-time header as seconds since the epoch; None when it is absent or not a finite
    number (a message from another producer may carry anything there)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def _sent_at(request: Any) -> float | None:
    raw = getattr(request, SENT_HEADER, None)
    if raw is None:
        headers = getattr(request, "headers", None) or {}
        raw = headers.get(SENT_HEADER)
    sent = _seconds(raw)
    eta = getattr(request, "eta", None)
    if eta:
        try:
            eta_s = (eta if isinstance(eta, datetime) else datetime.fromisoformat(eta)).timestamp()
        except (TypeError, ValueError):
            eta_s = None
        if eta_s is not None and (sent is None or eta_s > sent):
            return eta_s
    return sent


def _set_sent_header(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None and SENT_HEADER not in headers:
        headers[SENT_HEADER] = time.time()


class _Receivers:
    """Signal receivers bound to one app and its capture."""

    def __init__(self, app: TaskyardApp, capture: Capture) -> None:
        self.app = app
        self.capture = capture

    def _direct(self, task_id: str | None) -> bool:
        """Whether a lean handler records ``task_id`` itself (Capture.run_started)."""
        direct = self.capture.direct
        return direct is not None and task_id == direct

    def received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        try:
            if (
                request is None
                or getattr(sender, "app", self.app) is not self.app
                or getattr(request, CAPTURED_ATTR, False)
            ):
                return
            name = request.name
            queue = _queue_of(request, "unknown")
            self.capture.count(name, queue, "received")
            self.capture.event(
                request.id, "received", name, queue, str(getattr(request, "hostname", "") or "")
            )
        except Exception:
            logger.warning("taskyard capture: task_received hook failed", exc_info=True)

    def prerun(
        self, sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any
    ) -> None:
        try:
            if task is None or task.app is not self.app or self._direct(task_id):
                return
            now = time.time()
            request = task.request
            key = (task.name, _queue_of(request, getattr(task, "queue", None) or "unknown"))
            setattr(request, _KEY_ATTR, key)
            setattr(request, _START_ATTR, time.perf_counter())
            sent = _sent_at(request)
            self.capture.started(key[0], key[1], None if sent is None else max(0.0, now - sent))
            self.capture.event(
                request.id,
                "started",
                key[0],
                key[1],
                str(request.hostname or ""),
                str(request.retries or ""),
            )
        except Exception:
            logger.warning("taskyard capture: task_prerun hook failed", exc_info=True)

    def postrun(
        self,
        sender: Any = None,
        task_id: str | None = None,
        task: Any = None,
        state: str | None = None,
        **_: Any,
    ) -> None:
        try:
            if task is None or task.app is not self.app or self._direct(task_id):
                return
            request = task.request
            key = getattr(request, _KEY_ATTR, None)
            if key is None:
                return
            event = STATE_EVENT.get(state or "")
            start = getattr(request, _START_ATTR, None)
            # An ignored or rejected run (a guard's deferral raises Ignore) did no work: its
            # runtime would drag the percentiles towards zero.
            runtime_s = None if start is None or event is None else time.perf_counter() - start
            self.capture.finished(key[0], key[1], event, runtime_s)
            if event is not None:
                self.capture.event(
                    request.id,
                    event,
                    key[0],
                    key[1],
                    str(request.hostname or ""),
                    "" if runtime_s is None else f"{runtime_s:.6f}",
                )
        except Exception:
            logger.warning("taskyard capture: task_postrun hook failed", exc_info=True)

    def sent(
        self,
        sender: Any = None,
        headers: dict[str, Any] | None = None,
        routing_key: str | None = None,
        **_: Any,
    ) -> None:
        try:
            owner = sending_app.get()
            if headers is None or (owner is not None and owner is not self.app):
                return
            task_id = headers.get("id")
            if task_id:
                # The time set before publishing: a worker may receive it before this runs.
                sent_at = headers.get(SENT_HEADER)
                self.capture.event(
                    str(task_id),
                    "sent",
                    str(headers.get("task") or sender),
                    str(routing_key or ""),
                    str(headers.get("origin") or ""),
                    at=float(sent_at) if sent_at is not None else None,
                )
        except Exception:
            logger.warning("taskyard capture: after_task_publish hook failed", exc_info=True)

    def dead(
        self,
        sender: Any = None,
        task_id: str | None = None,
        reason: str = "",
        queue: str = "",
        detail: str = "",
        **_: Any,
    ) -> None:
        try:
            if task_id is None or get_current_app() is not self.app:
                return
            self.capture.event(task_id, "dead", str(sender), queue, "", f"{reason}: {detail}")
        except Exception:
            logger.warning("taskyard capture: task_dead hook failed", exc_info=True)

    def revoked(
        self,
        sender: Any = None,
        request: Any = None,
        terminated: bool = False,
        signum: Any = None,
        expired: bool = False,
        **_: Any,
    ) -> None:
        # Celery's task_revoked: a revoked task discarded on arrival, or terminated while it ran
        # (request: the task's context, sender: the task). Without this step the timeline of a
        # cancelled task ends at "sent" or "received", as if it were stuck.
        try:
            if request is None or getattr(sender, "app", self.app) is not self.app:
                return
            name = str(getattr(sender, "name", "") or getattr(request, "task", "") or "")
            if expired:
                detail = "expired"
            elif terminated:
                detail = f"terminated (signal {signum})" if signum else "terminated"
            else:
                detail = "discarded"
            self.capture.event(
                str(request.id),
                "revoked",
                name,
                _queue_of(request, "unknown"),
                str(getattr(request, "hostname", "") or ""),
                detail,
            )
        except Exception:
            logger.warning("taskyard capture: task_revoked hook failed", exc_info=True)

    def deferred(
        self,
        sender: Any = None,
        level: Any = None,
        task_id: str | None = None,
        reason: str = "",
        **_: Any,
    ) -> None:
        try:
            name = str(sender)
            # The signal names the task only; several apps in one process (and shared tasks
            # registered on each) must not all count it: the app running the task does.
            running = get_current_worker_task()
            owner = running.app if running is not None else get_current_app()
            if owner is not self.app or name not in self.app.tasks:
                return
            queue = str(getattr(level, "value", level) or "unknown")
            self.capture.count(name, queue, "deferred")
            if task_id:
                self.capture.event(str(task_id), "deferred", name, queue, "", str(reason))
        except Exception:
            logger.warning("taskyard capture: task_deferred hook failed", exc_info=True)

    def shutdown(self, **_: Any) -> None:
        try:
            self.capture.close()
        except Exception:
            logger.warning("taskyard capture: final flush failed", exc_info=True)


def install_capture(app: TaskyardApp, runtime: Runtime) -> Capture | None:
    """Connect the capture receivers for ``app`` (no I/O); None when capture is disabled."""
    if not runtime.settings.monitoring.capture_enabled:
        return None
    capture = Capture(runtime)
    receivers = _Receivers(app, capture)
    uid = f"taskyard.capture.{id(app)}"
    signals.before_task_publish.connect(
        _set_sent_header, weak=False, dispatch_uid="taskyard.capture.sent_at"
    )
    signals.task_received.connect(receivers.received, weak=False, dispatch_uid=uid + ".received")
    signals.task_prerun.connect(receivers.prerun, weak=False, dispatch_uid=uid + ".prerun")
    signals.task_postrun.connect(receivers.postrun, weak=False, dispatch_uid=uid + ".postrun")
    taskyard_signals.task_deferred.connect(
        receivers.deferred, weak=False, dispatch_uid=uid + ".deferred"
    )
    signals.after_task_publish.connect(receivers.sent, weak=False, dispatch_uid=uid + ".sent")
    taskyard_signals.task_dead.connect(receivers.dead, weak=False, dispatch_uid=uid + ".dead")
    signals.task_revoked.connect(receivers.revoked, weak=False, dispatch_uid=uid + ".revoked")
    signals.worker_process_shutdown.connect(
        receivers.shutdown, weak=False, dispatch_uid=uid + ".process_shutdown"
    )
    signals.worker_shutdown.connect(receivers.shutdown, weak=False, dispatch_uid=uid + ".shutdown")
    atexit.register(receivers.shutdown)
    runtime.capture = capture
    return capture


def capture_of(app: TaskyardApp) -> Capture | None:
    """The capture installed on ``app``, if any."""
    runtime = find_runtime(app)
    capture = runtime.capture if runtime is not None else None
    return capture if isinstance(capture, Capture) else None
