"""The lean execution path: from a fetched message to the task function with the least work.

Celery's default strategy (``celery.worker.strategy.default``) turns every message into a full
``Request``, hands it to the pool (``execute_using_pool`` -> ``apply_async`` -> ``apply_target``
-> ``fast_trace_task``, which decodes the body a second time) and gets the outcome back through
the pool's callbacks. On a solo pool (each process of the ``fast`` profile) the task runs on the
consumer's own thread, so none of that hand-off is needed. :func:`strategy` is the task class's
``Strategy`` (Celery's seam, ``Task.start_strategy``): on a solo pool it calls the task's tracer
(``task.__trace__``, Celery's own, which runs ``task_prerun``/``postrun``/``success``/
``failure``/``retry``, stores results, pushes ``self.request``, calls ``on_retry`` and links)
straight from the payload the dead-letter gate already decoded, then acknowledges through the
message's own ack (``message.ack`` -> the channel's ``QoS.ack`` -> ``queue_ack``, where the
transport applies acknowledgement hooks).

What it keeps from Celery's handler, each the same call: ``task_received`` (with a
:class:`LeanRequest`), the ``task-received``/``task-started``/``task-succeeded`` events with
Celery's fields, the worker state that ``inspect active``/``stats`` and revoke read, the
INFO "received" line, acks late (or early, for a task with ``acks_late=False``). Any other
outcome than success (failure, retry, ``Ignore``, ``Reject``) is handed to a full Celery
``Request`` built on the spot, whose ``on_failure`` decides the ack or requeue and sends the
events exactly as the default path does. Messages the lean path does not take go to Celery's
default handler unchanged: an ETA or an expiry, a revoked id, a rate-limited task, a protocol 1
or hybrid body, a consumer with task-message callbacks (autoscale), a restarted connection
whose prefetch count is being restored.

Celery internals relied on (celery 5.7; ``tests/workers/test_lean.py`` checks each seam):
``Task.Strategy``/``start_strategy`` and the handler's signature ``(message, body, ack,
reject, callbacks)``; ``Consumer.update_strategies`` setting ``task.__trace__`` after the
strategies; the tracer's return ``(R, I, T, Rstr)`` with ``I`` None on success; ``Request``'s
constructor arguments and ``on_success((failed, retval, runtime))``; ``celery.worker.state``'s
``requests``, ``active_requests``, ``total_count``, ``all_total_count``, ``successful_requests``
and ``revoked``; ``Consumer.on_task_message``, ``event_dispatcher``, ``disable_rate_limits``,
``_maximum_prefetch_restored``/``restart_count``; the solo pool's class.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.app import trace as celery_trace
from celery.app.trace import build_tracer
from celery.concurrency.solo import TaskPool as SoloPool
from celery.states import SUCCESS
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from celery.worker.request import logger as request_logger
from celery.worker.strategy import default as default_strategy

from taskyard.runtime import find_runtime
from taskyard.workers.speedups import lean_enabled, utcoffset

log = logging.getLogger("taskyard.workers.lean")
#: Celery's own logger for the "Task ... received" line, so log filters see the same name.
celery_log = logging.getLogger("celery.worker.strategy")

Handler = Callable[..., Any]


class LeanRequest:
    """What the lean path knows of a running message: the attributes Celery's ``Request``
    offers most often (``id``, ``name``, ``args``, ``kwargs``, ``hostname``, ``delivery_info``,
    ``eta``, ``expires``, ...). Anything else (``info()``, ``revoked()``, ...) comes from a full
    Celery ``Request`` built from the same message on first use, so a ``task_received``
    receiver or ``inspect active`` written for Celery's request works unchanged."""

    __slots__ = (
        "__weakref__",  # celery.worker.state.active_requests is a WeakSet
        "_full",
        "_make_full",
        "args",
        "delivery_info",
        "hostname",
        "id",
        "kwargs",
        "message",
        "name",
        "request_dict",
        "time_start",
        "worker_pid",
    )

    eta = None
    expires = None
    acknowledged = False
    #: The lean handler records the task's metrics itself (``Capture.run_started``): the
    #: capture's task_received receiver reads this (monitoring.capture.CAPTURED_ATTR).
    taskyard_captured = True

    def __init__(
        self,
        task_id: str,
        name: str,
        request_dict: dict[str, Any],
        message: Any,
        make_full: Callable[[], Any],
    ) -> None:
        self.id = task_id
        self.name = name
        self.args = request_dict["args"]
        self.kwargs = request_dict["kwargs"]
        self.hostname = request_dict["hostname"]
        self.delivery_info = request_dict["delivery_info"]
        self.request_dict = request_dict
        self.message = message
        self.time_start: float | None = None
        self.worker_pid: int | None = None
        self._make_full = make_full
        self._full: Any = None

    @property
    def full(self) -> Any:
        """Celery's ``Request`` for the same message (built once)."""
        if self._full is None:
            self._full = self._make_full()
            self._full.time_start = self.time_start
            self._full.worker_pid = self.worker_pid
        return self._full

    @property
    def argsrepr(self) -> str:
        return str(self.request_dict.get("argsrepr") or "")

    @property
    def kwargsrepr(self) -> str:
        return str(self.request_dict.get("kwargsrepr") or "")

    @property
    def root_id(self) -> str | None:
        return self.request_dict.get("root_id")

    @property
    def parent_id(self) -> str | None:
        return self.request_dict.get("parent_id")

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined above: Celery's Request has them.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.full, name)

    def __repr__(self) -> str:
        return f"<LeanRequest {self.name}[{self.id}]>"


def applies(task: Any, app: Any, consumer: Any) -> bool:
    """Whether ``task`` runs on the lean path in ``consumer``'s worker.

    The solo pool only: a prefork worker runs the task in another process, where Celery's own
    pool protocol (time limits, process recycling, lost-process detection) is the point.
    """
    if not isinstance(consumer.pool, SoloPool) or not lean_enabled(app):
        return False
    return not (task.rate_limit and not consumer.disable_rate_limits)


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Handler:
    """``Task.Strategy`` of taskyard tasks: the lean handler where it applies, else Celery's."""
    fallback: Handler = default_strategy(task, app, consumer, **kwargs)
    if not applies(task, app, consumer):
        return fallback
    return _lean_handler(task, app, consumer, fallback)


def _lean_handler(task: Any, app: Any, consumer: Any, fallback: Handler) -> Handler:
    hostname = consumer.hostname
    connection_errors = consumer.connection_errors
    eventer = consumer.event_dispatcher
    task_sends_events = bool(eventer and eventer.enabled and task.send_events)
    events_on = eventer.send if task_sends_events else None
    revoked = consumer.controller.state.revoked
    task_callbacks = consumer.on_task_message
    acks_late = bool(task.acks_late)
    received = signals.task_received
    does_info = celery_log.isEnabledFor(logging.INFO)
    pid = os.getpid()
    requests = worker_state.requests
    active = worker_state.active_requests
    successful = worker_state.successful_requests
    total_count = worker_state.total_count
    all_total = worker_state.all_total_count
    request_cls = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )
    # Metric capture, called directly (what its task_received, task_prerun and task_postrun
    # receivers would record, which leave this task alone meanwhile).
    runtime = find_runtime(app)
    capture = runtime.capture if runtime is not None else None
    default_queue = getattr(task, "queue", None) or "unknown"

    def tracer() -> Any:
        # Consumer.update_strategies builds it after the strategies; a task registered later
        # (or reset) gets one here, as Celery's trace_task does.
        trace = task.__trace__
        if trace is None:
            trace = task.__trace__ = build_tracer(task.name, task, app.loader, hostname, app=app)
        return trace

    def handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any) -> Any:
        headers = message.headers
        # Task events only while the dispatcher's groups take them (monitoring/events.py
        # drops "task" while nothing listens).
        groups = eventer.groups if events_on is not None else None
        send_event = events_on if not groups or "task" in groups else None
        payload = message.payload  # decoded once: the dead-letter gate read it already
        if (
            body is not None
            or type(payload) is not list
            or task_callbacks
            or headers.get("eta")
            or headers.get("expires")
            or headers["id"] in revoked
            or (not consumer._maximum_prefetch_restored and consumer.restart_count > 0)
        ):
            return fallback(message, body, ack, reject, callbacks)
        task_id = headers["id"]
        name = headers.get("shadow") or headers["task"]
        args, kwargs, embed = payload
        info = message.delivery_info or {}
        properties = message.properties or {}
        request = dict(headers)
        request.update(
            {
                "properties": properties,
                "reply_to": properties.get("reply_to"),
                "correlation_id": properties.get("correlation_id"),
                "hostname": hostname,
                "delivery_info": {
                    "exchange": info.get("exchange"),
                    "routing_key": info.get("routing_key"),
                    "priority": properties.get("priority"),
                    "redelivered": info.get("redelivered", False),
                },
                "args": args,
                "kwargs": kwargs,
                "is_eager": False,
            }
        )
        if embed:
            request.update(embed)

        def make_full() -> Any:
            full = request_cls(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=hostname,
                eventer=eventer,
                task=task,
                connection_errors=connection_errors,
                body=payload,
                headers=headers,
                decoded=True,
                utc=True,
            )
            # An early ack was made above: the Request must not ack (or reject) again.
            full.acknowledged = not acks_late
            return full

        lean = LeanRequest(task_id, name, request, message, make_full)
        if does_info:
            context = {
                "id": task_id,
                "name": name,
                "args": lean.argsrepr,
                "kwargs": lean.kwargsrepr,
                "eta": None,
            }
            celery_log.info(celery_trace.LOG_RECEIVED, context, extra={"data": context})
        if received.receivers:
            received.send(sender=consumer, request=lean)
        if send_event is not None:
            send_event(
                "task-received",
                utcoffset=utcoffset,
                uuid=task_id,
                name=name,
                args=lean.argsrepr,
                kwargs=lean.kwargsrepr,
                root_id=request.get("root_id"),
                parent_id=request.get("parent_id"),
                retries=request.get("retries", 0),
                eta=None,
                expires=None,
            )
        # Accepted: what celery.worker.state.task_accepted records, for inspect and stats.
        lean.time_start = time.time()
        lean.worker_pid = pid
        requests[task_id] = lean
        active.add(lean)
        total_count[name] += 1
        all_total[0] += 1
        # A check that must stop a task before it starts (a durable cancel) belongs here, before
        # the early ack and the tracer; a refused message still leaves through ack() or
        # reject(), so whatever the transport releases at acknowledgement is released.
        if not acks_late:
            ack(request_logger, connection_errors)
        if send_event is not None:
            send_event("task-started", utcoffset=utcoffset, uuid=task_id)
        queue = str(info.get("routing_key") or default_queue)
        if capture is not None:
            capture.run_started(
                task_id,
                name,
                queue,
                hostname,
                lean.time_start,
                headers,
                str(request.get("retries") or ""),
            )
        started = time.perf_counter()
        try:
            retval, failed, runtime, retval_repr = tracer()(task_id, args, kwargs, request)
        finally:
            requests.pop(task_id, None)
            active.discard(lean)
            if capture is not None:
                capture.direct = None
        if capture is not None:
            state = SUCCESS if failed is None else failed.state
            capture.run_finished(
                task_id, name, queue, hostname, state, time.perf_counter() - started
            )
        if failed is None:
            successful.add(task_id)
            if acks_late:
                ack(request_logger, connection_errors)
            if send_event is not None:
                send_event(
                    "task-succeeded",
                    utcoffset=utcoffset,
                    uuid=task_id,
                    result=retval_repr,
                    runtime=runtime,
                )
            return None
        # Failure, retry, Ignore, Reject: Celery's own Request decides (acks, requeue, events).
        lean.full.on_success((1, retval, runtime))
        return None

    return handler
