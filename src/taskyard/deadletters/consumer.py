"""Poison quarantine and bounded redelivery, in the worker's consumer (a bootstep).

Relies on Celery internals (celery/worker/consumer/consumer.py, 5.x): the event loop builds its
message callback with ``Consumer.create_task_handler()`` when it starts, and that callback
captures ``on_unknown_message``, ``on_unknown_task`` and ``on_invalid_task`` from the consumer
at that moment, and calls ``self.on_decode_error``. This bootstep replaces those four handlers
and wraps ``create_task_handler`` on the consumer instance before the loop starts, so every
task message passes :meth:`Gate.check` first. The names are declared in ``SEAMS``
(``tests/test_seams.py``); ``tests/deadletters/test_consumer.py`` tests how Celery uses them.

Today one malformed message stops every worker of its queue: a body of content type
``application/data`` (which kombu passes through undecoded) makes Celery's strategy raise a
``TypeError`` outside its handlers, the worker dies, the message is restored, the next worker
dies on it. Here such a message, and any other that is not a task (not decodable, a content type
the app does not accept, pickle included: it is never loaded, a body that is not
``[args, kwargs, embed]``, ``task``/``id`` headers missing, a task name this worker does not
know), goes to the dead letters with its raw body and headers and is acknowledged.

Deliveries: a message the broker redelivers (``delivery_info["redelivered"]``, set by RabbitMQ
and by kombu's Redis transport when it restores an unacknowledged message) came back without an
acknowledgement, because the process running it died, or its worker did. Only those are
counted (one INCR in Redis; a first delivery costs nothing); once a message has been delivered
``max_deliveries`` times it goes to the dead letters as "crashed" instead of running again.
Batch flush tasks are left to the batch's own count (its lease takeover, batching/acquire.lua).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from kombu.exceptions import DecodeError
from kombu.serialization import prepare_accept_content

from taskyard import serialization
from taskyard.deadletters.recorder import Recorder
from taskyard.runtime import runtime_of
from taskyard.seams import Seam

# Celery internals the gate relies on (their existence checked by tests/test_seams.py; how the
# loop and the callback use them by tests/deadletters/test_consumer.py).
SEAMS = (
    Seam("celery.worker.consumer.consumer.Consumer", "create_task_handler"),
    Seam("celery.worker.consumer.consumer.Consumer", "on_decode_error", params=("message", "exc")),
    Seam(
        "celery.worker.consumer.consumer.Consumer", "on_unknown_message", params=("body", "message")
    ),
    Seam(
        "celery.worker.consumer.consumer.Consumer",
        "on_unknown_task",
        params=("body", "message", "exc"),
    ),
    Seam(
        "celery.worker.consumer.consumer.Consumer",
        "on_invalid_task",
        params=("body", "message", "exc"),
    ),
    Seam("celery.worker.loops", "asynloop"),
    Seam("celery.worker.loops", "synloop"),
)

log = logging.getLogger(__name__)


class Gate:
    """The checks every task message passes before Celery's own handler sees it."""

    def __init__(self, consumer: Any) -> None:
        app = consumer.app
        runtime = runtime_of(app)
        self.consumer = consumer
        self.app = app
        self.runtime = runtime
        self.recorder = Recorder(runtime)
        self.accept = frozenset(prepare_accept_content(app.conf.accept_content))
        self.default_max = runtime.settings.max_deliveries
        self.count_ttl_s = max(1, int(runtime.settings.dead_letters.delivery_count_ttl_s))
        self._limits: dict[str, int | None] = {}

    @property
    def worker(self) -> str:
        return str(self.consumer.hostname)

    # --- the wrapped callback -----------------------------------------------------------------
    def wrap(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``handler`` (Celery's on_task_received) behind the checks."""
        check = self.check
        strategies = self.consumer.strategies
        connection_errors = tuple(self.consumer.connection_errors) + tuple(
            getattr(self.consumer, "channel_errors", ()) or ()
        )

        def on_task_received(message: Any) -> Any:
            if not check(message, strategies):
                return None
            try:
                return handler(message)
            except connection_errors:
                raise
            except Exception as exc:
                # Celery raised outside its own handlers (the worker would stop): quarantine,
                # unless the task was already handed on (then it is Celery's to finish).
                headers = message.headers if isinstance(message.headers, dict) else {}
                if headers.get("id") in worker_state.requests or message.acknowledged:
                    log.exception(
                        "error after task %s was accepted; left to Celery", headers.get("id")
                    )
                    return None
                return self.quarantine(message, f"unhandled: {type(exc).__name__}: {exc}", exc)

        return on_task_received

    def check(self, message: Any, strategies: dict[str, Any]) -> bool:
        """True when ``message`` may go on to Celery; else it was quarantined or dead-lettered."""
        if message.content_type not in self.accept:
            return self.quarantine(
                message,
                f"content type {message.content_type!r} is not "
                f"accepted (accepted: {', '.join(sorted(self.accept))})",
            )
        headers = message.headers
        if not isinstance(headers, dict):
            return self.quarantine(message, "headers are not a mapping")
        body = message.body
        depth = (
            serialization.too_deep(body)
            if message.content_type == serialization.CONTENT_TYPE and isinstance(body, bytes | str)
            else None
        )
        if depth is not None:
            # Sent around .delay(), which refuses it; checked before decoding (which fails near
            # 990 levels). A prefork pool fails to pickle it to its process from about 480
            # levels and would hold the message, and a pool slot, for ever.
            return self.quarantine(
                message,
                f"arguments nested {depth} levels deep (the limit is "
                f"{serialization.MAX_DEPTH}: a prefork pool cannot pass them to its process)",
            )
        name = headers.get("task")
        try:
            # Cached by kombu: Celery's strategy reads the same decoded payload.
            payload = message.payload
        except DecodeError as exc:
            return self.quarantine(message, f"undecodable: {exc}", exc)
        except Exception as exc:
            return self.quarantine(message, f"undecodable: {type(exc).__name__}: {exc}", exc)
        if name is None:
            # Task protocol 1 (everything in the body): Celery's handler checks it.
            if (
                isinstance(payload, dict)
                and isinstance(payload.get("task"), str)
                and isinstance(payload.get("id"), str)
            ):
                return True
            return self.quarantine(message, "not a task: no 'task' header and no protocol 1 body")
        if not isinstance(name, str) or not isinstance(headers.get("id"), str) or not headers["id"]:
            return self.quarantine(
                message, "not a task: 'task' and 'id' headers must be non-empty strings"
            )
        if not _is_body(payload):
            return self.quarantine(message, "not a task: the body is not [args, kwargs, embed]")
        if name not in strategies:
            return self.quarantine(message, f"unknown task {name!r}")
        info = message.delivery_info
        if info and info.get("redelivered"):
            return self.count_delivery(message, name, headers["id"], payload)
        return True

    # --- bounded redelivery -------------------------------------------------------------------
    def limit_of(self, name: str) -> int | None:
        """max_deliveries of task ``name``; None for batch flush tasks (counted per batch)."""
        if name not in self._limits:
            task = self.app.tasks.get(name)
            if task is not None and getattr(task, "taskyard_batch", None) is not None:
                self._limits[name] = None
            else:
                own = getattr(task, "max_deliveries", None)
                self._limits[name] = int(own) if own else self.default_max
        return self._limits[name]

    def count_delivery(self, message: Any, name: str, task_id: str, payload: Any) -> bool:
        """Count one redelivery; dead-letter the message once it reached its limit."""
        limit = self.limit_of(name)
        if limit is None:
            return True
        key = self.runtime.keys.deliveries(task_id)
        try:
            pipe = self.runtime.redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self.count_ttl_s)
            redeliveries = int(pipe.execute()[0])
        except Exception:
            # Fail open: the message runs; a crash loop is bounded again once Redis is back.
            log.warning("delivery of %s[%s] not counted", name, task_id, exc_info=True)
            return True
        deliveries = redeliveries + 1
        if deliveries <= limit:
            return True
        entry = self.recorder.from_message(
            "crashed",
            message,
            detail=f"delivered {deliveries} times without an "
            f"acknowledgement (max_deliveries={limit}): each delivery's process died",
            worker=self.worker,
            payload=payload,
            deliveries=deliveries,
        )
        entry.exception_type = "WorkerLostError"
        entry.exception = (
            f"{name}[{task_id}] was delivered {redeliveries} times before and "
            f"never acknowledged; not run again"
        )
        if not self.recorder.record(entry):
            return True  # not recorded: run it rather than lose it
        log.error(
            "task %s[%s]: delivered %d times, moved to the dead letters (crashed)",
            name,
            task_id,
            deliveries,
        )
        try:
            self.runtime.redis.delete(key)
        except Exception:  # it expires anyway
            log.warning("delivery count of %s not deleted", task_id, exc_info=True)
        message.ack()
        return False

    # --- quarantine ---------------------------------------------------------------------------
    def quarantine(self, message: Any, detail: str, exc: BaseException | None = None) -> bool:
        """Put ``message`` in the dead letters (reason "poison") and acknowledge it.

        When the store cannot be reached the message is requeued once; a message that was
        already redelivered is then logged in full and acknowledged, so it never loops.
        """
        try:
            entry = self.recorder.from_message(
                "poison", message, detail=detail, worker=self.worker, exc=exc
            )
            recorded = self.recorder.record(entry)
        except Exception:
            log.exception("poison message not recorded")
            recorded = False
        if recorded:
            log.error("poison message quarantined as %s: %s", entry.id, detail)
            message.ack()
            return False
        info = message.delivery_info or {}
        if not info.get("redelivered"):
            message.reject(requeue=True)
            return False
        log.critical(
            "poison message dropped (dead-letter store unreachable): %s; "
            "content type %r, headers %r, body %r",
            detail,
            message.content_type,
            message.headers,
            message.body[:4096] if message.body else message.body,
        )
        message.ack()
        return False

    # --- Celery's own handlers, replaced ------------------------------------------------------
    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self.quarantine(message, f"undecodable: {exc}", exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.quarantine(message, "not a task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        self.quarantine(message, f"unknown task {name!r}", exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self.quarantine(message, f"invalid task: {exc}", exc)


def _is_body(payload: Any) -> bool:
    if isinstance(payload, dict):
        # A hybrid protocol 1/2 message: Celery converts it (hybrid_to_proto2).
        return "args" in payload and isinstance(payload.get("kwargs", {}), dict)
    return (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
        and (payload[2] is None or isinstance(payload[2], dict))
    )


class DeadLetterGate(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep installing the :class:`Gate` on the worker's consumer."""

    label = "taskyard dead-letter gate"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        gate = Gate(c)
        c._taskyard_gate = gate
        original = c.create_task_handler
        # Instance attributes shadow the consumer's methods; create_task_handler reads them
        # when the event loop starts, after every bootstep's __init__.
        c.on_decode_error = gate.on_decode_error
        c.on_unknown_message = gate.on_unknown_message
        c.on_unknown_task = gate.on_unknown_task
        c.on_invalid_task = gate.on_invalid_task

        def create_task_handler(*args: Any, **kw: Any) -> Any:
            return gate.wrap(original(*args, **kw))

        c.create_task_handler = create_task_handler
