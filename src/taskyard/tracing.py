"""OpenTelemetry traces across processes: a producer span at publish, a consumer span per run.

On with ``TASKYARD_TRACING=true`` and the ``otel`` extra (``pip install taskyard[otel]``); spans
go to an OTLP/HTTP collector configured by the standard ``OTEL_EXPORTER_OTLP_*`` and
``OTEL_SERVICE_NAME`` variables, read by the exporter itself.

- ``before_task_publish`` starts a PRODUCER span (a child of the span current in the sending
  thread: a retry or a task sent from a task joins its trace) and writes its W3C
  ``traceparent``/``tracestate`` into the message headers; ``after_task_publish`` ends it. Every
  publishing path fires those signals: Celery's, taskyard's fast ``.delay()``, countdowns (the
  headers wait with the message in the delayed set), dead-letter replays (the stored headers
  are published again, so a replay joins the original trace).
- ``task_prerun`` starts a CONSUMER span whose parent is read from those headers (Celery puts
  unknown message headers on ``task.request``) and makes it current while the task runs, so
  spans the task makes are its children; ``task_postrun`` ends it.
- Each process has its own provider, made on first use in that process: a provider made before
  a fork is never used in the child, whose batch-export thread did not survive the fork. A
  prefork child flushes its spans when it exits (``worker_process_shutdown``, sent by the pool
  in the child, so ``max_tasks_per_child=1`` loses nothing); other processes at interpreter exit.

A batch flush's consumer span belongs to the trace of the message that claimed the batch (the
producer that filled the buffer, or the reaper); the items' own producers are not linked: items
are stored as bare JSON values, one list entry each, and carrying a trace context in every item
would grow every item for a link few backends draw.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from celery import signals

from taskyard.errors import ConfigurationError
from taskyard.runtime import Runtime

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

#: Producer spans waiting for ``after_task_publish``, by task id. A publish that raises never
#: sends that signal; beyond this many the oldest are ended as failed, so nothing grows.
MAX_OPEN_PUBLISH_SPANS = 10_000

_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: Tracer | None = None
_provider_pid = 0
_publishing: OrderedDict[str, Span] = OrderedDict()
_running: dict[str, tuple[Span, object]] = {}
_installed = False
_propagator: TraceContextTextMapPropagator | None = None


def _require_sdk() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"TASKYARD_TRACING=true needs OpenTelemetry's SDK and OTLP exporter ({exc.name} is "
            "missing): pip install 'taskyard[otel]', or set TASKYARD_TRACING=false",
            setting="TASKYARD_TRACING",
            value=True,
        ) from None


def provider() -> TracerProvider:
    """This process's tracer provider, made on first use after start or fork."""
    global _provider, _provider_pid, _tracer
    pid = os.getpid()
    if _provider is not None and _provider_pid == pid:
        return _provider
    with _lock:
        if _provider is None or _provider_pid != pid:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            made = TracerProvider(resource=Resource.create({"service.name": _service_name()}))
            made.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            # A parent's open spans are not ours to end in a child.
            _publishing.clear()
            _running.clear()
            _provider, _provider_pid = made, pid
            _tracer = made.get_tracer("taskyard")
    return _provider


def _service_name() -> str:
    from opentelemetry.sdk.resources import OTELResourceDetector

    detected = OTELResourceDetector().detect().attributes.get("service.name")
    return str(detected) if detected else "taskyard"


def tracer() -> Tracer:
    """This process's tracer (made with its provider: getting one per span costs a third of a
    span's creation)."""
    if _tracer is None or _provider_pid != os.getpid():
        provider()
    assert _tracer is not None
    return _tracer


def flush(timeout_s: float = 10.0) -> bool:
    """Export every finished span of this process now; whether it finished in time."""
    if _provider is None or _provider_pid != os.getpid():
        return True
    return bool(_provider.force_flush(int(timeout_s * 1000)))


def shutdown() -> None:
    """Flush and stop this process's provider (idempotent)."""
    global _provider
    if _provider is not None and _provider_pid == os.getpid():
        _provider.shutdown()
        _provider = None


def _w3c() -> TraceContextTextMapPropagator:
    """W3C trace context alone: the message carries ``traceparent``/``tracestate``, and the
    global composite propagator would also parse baggage on every message."""
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagator = TraceContextTextMapPropagator()
    return _propagator


# --- signal receivers -------------------------------------------------------------------------
def _on_before_publish(
    sender: str | None = None,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    **_: Any,
) -> None:
    if headers is None:
        return
    from opentelemetry import trace

    task_id = str(headers.get("id") or "")
    span = tracer().start_span(
        f"send {sender}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "celery",
            "messaging.operation.type": "send",
            "messaging.destination.name": routing_key or "",
            "messaging.message.id": task_id,
            "celery.task_name": str(sender),
        },
    )
    _w3c().inject(headers, context=trace.set_span_in_context(span))
    with _lock:
        _publishing[task_id] = span
        while len(_publishing) > MAX_OPEN_PUBLISH_SPANS:
            stale = _publishing.popitem(last=False)[1]
            stale.set_status(trace.StatusCode.ERROR, "publish did not complete")
            stale.end()


def _on_after_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None:
        return
    with _lock:
        span = _publishing.pop(str(headers.get("id") or ""), None)
    if span is not None:
        span.end()


def _carrier(request: Any) -> dict[str, str]:
    carrier = {}
    for name in ("traceparent", "tracestate"):
        value = getattr(request, name, None)
        if isinstance(value, str):
            carrier[name] = value
    return carrier


def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id is None or task is None:
        return
    from opentelemetry import context, trace

    parent = _w3c().extract(_carrier(task.request))
    span = tracer().start_span(
        f"run {task.name}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "celery",
            "messaging.operation.type": "process",
            "messaging.message.id": task_id,
            "celery.task_name": str(task.name),
        },
    )
    token = context.attach(trace.set_span_in_context(span, parent))
    _running[task_id] = (span, token)


def _on_failure(
    task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    entry = _running.get(task_id or "")
    if entry is None or exception is None:
        return
    from opentelemetry import trace

    entry[0].record_exception(exception)
    entry[0].set_status(trace.StatusCode.ERROR, type(exception).__name__)


def _on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    entry = _running.get(str(getattr(request, "id", "") or ""))
    if entry is not None:
        entry[0].add_event("retry", {"reason": str(reason)[:500]})


def _on_postrun(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    entry = _running.pop(task_id or "", None)
    if entry is None:
        return
    from opentelemetry import context

    span, token = entry
    span.end()
    try:
        context.detach(token)  # type: ignore[arg-type]
    except Exception:  # a task that left another context attached; the span is ended
        log.debug("trace context of task %s was not the current one", task_id)


def _on_process_shutdown(**_: Any) -> None:
    shutdown()


def install(app: Any, runtime: Runtime) -> None:
    """Connect the tracing receivers when ``TASKYARD_TRACING`` is on (once per process)."""
    global _installed
    if not runtime.settings.tracing:
        return
    _require_sdk()
    if _installed:
        return  # receivers are process-wide and see every app's tasks
    _installed = True
    signals.before_task_publish.connect(_on_before_publish, weak=False)
    signals.after_task_publish.connect(_on_after_publish, weak=False)
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.task_retry.connect(_on_retry, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    signals.worker_shutdown.connect(_on_process_shutdown, weak=False)
    atexit.register(shutdown)
