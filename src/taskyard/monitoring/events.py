"""Celery monitoring events (for Flower) at a fraction of their usual cost.

Celery publishes each ``task-sent`` event with its own broker round trip right after the task
message, which halves the rate of ``.delay()``; and a worker flushes its buffered task events
on the next event-loop turn, about one publish per task, which measured as nearly half of a
worker's main-loop time on no-op tasks. Both carry the same events here, in batches:

- producers append ``task-sent`` events to a bounded in-process buffer that a daemon thread
  publishes every ``event_flush_interval_s`` as one ``task.multi`` message (Celery's own batch
  format, which Flower and every ``EventReceiver`` read);
- workers flush their buffered task events on a timer of the same interval instead of on
  every loop turn (:class:`EventBatching`, a consumer bootstep).

And only while something listens. A Redis ``PUBLISH`` replies with the number of subscribers it
reached, and taskyard's transport keeps that reply (``Channel.fanout_reach``). When a batch
reached nobody (no Flower, no ``celery events``), the producer stops recording ``task-sent``
events and the worker stops sending task events (its dispatcher's groups drop ``task``; worker
heartbeats go on). Every ``event_probe_interval_s`` an empty batch is published, which every
``EventReceiver`` reads as no events; once it reaches a subscriber, events flow again. A
listener that connects to a quiet worker sees its task events from the next probe on. Measured
on the fast profile's no-op drain, the events were about 20 µs of a task's 170 µs of worker
CPU. ``event_probe_interval_s = 0`` publishes them whether or not anyone listens; a transport
other than taskyard's gives no reply, and events are always published there.

Events stay best-effort, as in Celery: a batch that cannot be published is dropped and logged.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from time import monotonic
from typing import Any

from celery import bootsteps
from celery.events.event import Event, get_exchange

from taskyard.outage import Outage
from taskyard.runtime import TaskyardApp, find_runtime, runtime_of, sending_app
from taskyard.seams import Seam
from taskyard.workers.speedups import utcoffset

# Celery internals the event batching relies on (checked by tests/test_seams.py): the
# consumer's flush of buffered events and the dispatcher's buffering hooks.
SEAMS = (
    Seam("celery.worker.consumer.consumer.Consumer", "_flush_events"),
    Seam("celery.events.dispatcher.EventDispatcher", "on_send_buffered", "instance"),
    Seam("celery.events.dispatcher.EventDispatcher", "buffer_limit", "instance"),
    Seam("celery.events.event", "get_exchange", params=("conn",)),
    Seam("celery.events.dispatcher.EventDispatcher", "groups", "instance"),
    Seam("celery.events.dispatcher.EventDispatcher", "producer", "instance"),
    Seam("celery.events.dispatcher.EventDispatcher", "exchange", "instance"),
    Seam("celery.events.dispatcher.EventDispatcher", "mutex", "instance"),
)

log = logging.getLogger(__name__)

#: Events a producer holds at most; beyond this the oldest are dropped (events are best-effort).
MAX_BUFFERED_EVENTS = 10_000
#: Task events a worker buffers before publishing them at once (Celery's default is 24; the
#: timer still publishes every event_flush_interval_s). Measured: 13 µs of main-process CPU per
#: event at 200 against 27-31 µs at 24, the encoding and publish spread over more events.
WORKER_EVENT_BUFFER_LIMIT = 200

_SENT_HEADERS = ("root_id", "parent_id", "eta", "expires", "retries")
#: Routing key of a batch of task events (Celery's "<group>.multi").
TASK_BATCH = "task.multi"
#: The dispatcher's groups while nobody listens: worker events (heartbeats) only.
QUIET_GROUPS = frozenset({"worker"})


class Audience:
    """Whether anything subscribes to task events, as the last publish of a batch told.

    Starts listening (a listener may be there already); :meth:`heard` records a publish's
    reach. While nobody listens, :meth:`probe_due` turns true every ``probe_s``.
    ``probe_s = 0`` keeps it listening for good.
    """

    def __init__(self, probe_s: float) -> None:
        self.probe_s = probe_s
        self.listening = True
        self._next_probe = 0.0

    def heard(self, reach: int | None) -> bool:
        """Record the subscribers a batch reached (None: unknown, nothing changes); returns
        whether the listening state changed."""
        if reach is None or not self.probe_s:
            return False
        was, self.listening = self.listening, reach > 0
        if not self.listening:
            self._next_probe = monotonic() + self.probe_s
        return was != self.listening

    def probe_due(self) -> bool:
        return not self.listening and monotonic() >= self._next_probe


def _reach(producer: Any, exchange: str) -> int | None:
    """Subscribers the producer's last task batch reached (taskyard's transport only)."""
    reach = getattr(producer.channel, "fanout_reach", None)
    return None if reach is None else reach.pop((exchange, TASK_BATCH), None)


class SentEvents:
    """Per-process buffer of ``task-sent`` events of one app, published in batches."""

    def __init__(self, app: TaskyardApp, interval_s: float, probe_s: float = 1.0) -> None:
        self.app = app
        self.interval_s = interval_s
        self.audience = Audience(probe_s)
        self.hostname = f"gen{os.getpid()}@{_node()}"
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_BUFFERED_EVENTS)
        self._pid = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._outage = Outage(log, "publishing task-sent events")

    def add(self, headers: dict[str, Any], exchange: str, routing_key: str) -> None:
        """Record one sent task; cheap (no I/O)."""
        if self._pid != os.getpid():
            self._start()
        if not self.audience.listening:
            return
        fields = {key: headers.get(key) for key in _SENT_HEADERS}
        fields.update(
            uuid=headers.get("id"),
            name=headers.get("task"),
            args=headers.get("argsrepr"),
            kwargs=headers.get("kwargsrepr"),
            queue=routing_key,
            exchange=exchange,
            routing_key=routing_key,
            hostname=self.hostname,
            pid=os.getpid(),
            utcoffset=utcoffset(),
        )
        self._events.append(Event("task-sent", **fields))

    def _start(self) -> None:
        # Started lazily, and again in a forked child, where the parent's thread does not exist.
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stopped = threading.Event()
            thread = threading.Thread(target=self._run, name="taskyard-sent-events", daemon=True)
            thread.start()
            atexit.register(self.flush)

    def _run(self) -> None:
        stopped = self._stopped
        while not stopped.wait(self.interval_s):
            if self.audience.probe_due():
                self._publish([])
            self.flush()

    def close(self) -> None:
        """Publish what is buffered and stop the publishing thread (the app closes);
        adding again starts a new one."""
        with self._lock:
            self._stopped.set()
            self._pid = 0
        self.flush()

    def flush(self) -> None:
        """Publish everything buffered as one ``task.multi`` message."""
        batch: list[dict[str, Any]] = []
        while self._events:
            try:
                batch.append(self._events.popleft())
            except IndexError:
                break
        if batch:
            self._publish(batch)

    def _publish(self, batch: list[dict[str, Any]]) -> None:
        """Publish one batch (empty: a probe for listeners) and note whom it reached."""
        try:
            with self.app.producer_or_acquire() as producer:
                exchange = get_exchange(producer.connection, name=self.app.conf.event_exchange)
                producer.publish(
                    batch,
                    exchange=exchange.name,
                    routing_key=TASK_BATCH,
                    declare=[exchange],
                    serializer="json",
                    retry=False,
                    headers={"hostname": self.hostname},
                )
                self.audience.heard(_reach(producer, exchange.name))
        except Exception as exc:  # events are best-effort and must not kill the thread
            if batch:
                self._outage.failed(exc, f"{len(batch)} events dropped")
            return
        self._outage.ok()


def on_after_task_publish(
    headers: dict[str, Any] | None = None, exchange: str = "", routing_key: str = "", **_: Any
) -> None:
    """``after_task_publish`` receiver: buffer a ``task-sent`` event for a taskyard app."""
    app = sending_app.get()
    if app is None or headers is None:
        return
    runtime = find_runtime(app)
    events = runtime.sent_events if runtime is not None else None
    if events is not None:
        events.add(headers, exchange, routing_key)


class EventBatching(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: flush the worker's buffered task events on a timer."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.pending = False
        self.probe_timer: Any = None

    def start(self, parent: Any) -> None:
        dispatcher = parent.event_dispatcher
        hub = parent.hub
        if dispatcher is None or hub is None or dispatcher.on_send_buffered is None:
            return
        settings = runtime_of(parent.app).settings
        interval = settings.event_flush_interval_s
        audience = Audience(settings.event_probe_interval_s)
        loud_groups = set(dispatcher.groups)
        exchange = dispatcher.exchange

        def heard() -> None:
            producer = dispatcher.producer
            if producer is not None and audience.heard(_reach(producer, exchange.name)):
                dispatcher.groups = loud_groups if audience.listening else set(QUIET_GROUPS)
                log.info(
                    "task events %s",
                    "resumed: a listener subscribed"
                    if audience.listening
                    else "paused: nothing subscribes to them",
                )

        def flush() -> None:
            self.pending = False
            parent._flush_events()
            heard()

        def probe() -> None:
            producer = dispatcher.producer
            if producer is None or not audience.probe_due():
                return
            try:
                with dispatcher.mutex:
                    producer.publish(
                        [],
                        exchange=exchange.name,
                        routing_key=TASK_BATCH,
                        declare=[exchange],
                        serializer=dispatcher.serializer,
                        headers=dispatcher.headers,
                    )
            except Exception:  # a probe is best-effort: the next one asks again
                log.debug("task event probe failed", exc_info=True)
                return
            heard()

        def schedule() -> None:
            if not self.pending:
                self.pending = True
                hub.call_later(interval, flush)

        dispatcher.on_send_buffered = schedule
        dispatcher.buffer_limit = max(dispatcher.buffer_limit, WORKER_EVENT_BUFFER_LIMIT)
        self.stop(parent)
        if audience.probe_s and "task" in dispatcher.buffer_group:
            self.probe_timer = hub.call_repeatedly(min(audience.probe_s, 1.0), probe)

    def stop(self, parent: Any) -> None:
        if self.probe_timer is not None:
            self.probe_timer.cancel()
            self.probe_timer = None


def _node() -> str:
    import socket

    return socket.gethostname()
