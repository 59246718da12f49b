"""Faster equivalents of three per-task steps of Celery's tracer, installed in taskyard workers.

Measured in one process on Celery's own tracer (``build_tracer``) around a task body that does
nothing, these three steps were about a quarter of the tracer's cost per task:

* **the request's custom headers**: every ``Context`` (the tracer builds one per task) finds
  the message headers that are not Celery's by building a set of Context's ~60 class attribute
  names and popping each one from a copy of the request; here the names are a frozenset made
  once, and the headers one set difference of the keys (same result: the non-Celery headers, or
  None when there are none);
* **the result's repr** for the ``task-succeeded`` event and the INFO line: ``saferepr`` walks
  its value through a generator of tokens even for ``None``, the most common result; here
  ``None``, booleans and ints below 2**53 get ``repr`` (what ``saferepr`` returns for them:
  ``tests/workers/test_speedups.py`` checks), anything else Celery's ``saferepr``;
* **the signal receivers**: ``task_prerun``/``postrun``/``success``/``failure``/``retry`` are
  created without Celery's per-sender receiver cache, so each send locks the signal and filters
  every receiver again; here that cache (``Signal.use_caching``, the dispatcher's own feature,
  cleared on every connect and disconnect) is on.

:func:`install` runs at ``worker_init`` (so prefork children inherit it) and is idempotent;
``TASKYARD_LEAN_PATH=false`` leaves Celery as it is. :func:`cache_publish_receivers` turns the
same cache on for ``before_task_publish``/``after_task_publish`` in every process with a
taskyard app (producers too): each ``.delay()`` sends both.
"""

from __future__ import annotations

import time
from typing import Any

from celery import signals
from celery.app import trace as celery_trace
from celery.app.task import Context
from celery.utils.saferepr import saferepr as celery_saferepr
from celery.utils.time import utcoffset as celery_utcoffset

from taskyard.runtime import find_runtime
from taskyard.seams import Seam

# Celery internals these rely on (checked by tests/test_seams.py; the behaviour by
# tests/workers/test_speedups.py): Context's header split, called by Context.__init__ when the
# request has no "headers"; the module-level name the tracer calls for the result's repr; the
# dispatcher's receiver cache.
SEAMS = (
    Seam("celery.app.task.Context", "_get_custom_headers"),
    Seam("celery.app.trace", "saferepr"),
    Seam("celery.utils.dispatch.signal.Signal", "use_caching", "instance"),
    Seam("celery.utils.dispatch.signal.Signal", "sender_receivers_cache", "instance"),
)

#: What Celery's _get_custom_headers leaves out: Context's class attributes and five names more.
CELERY_KEYS = frozenset(
    {*Context.__dict__, "lang", "task", "argsrepr", "kwargsrepr", "compression"}
)
#: Signals sent for every task run.
TASK_SIGNALS = (
    signals.task_prerun,
    signals.task_postrun,
    signals.task_success,
    signals.task_failure,
    signals.task_retry,
)
#: Signals sent for every task published.
PUBLISH_SIGNALS = (signals.before_task_publish, signals.after_task_publish)
_INT_BOUND = 2**53
_original: dict[str, Any] = {}
_offset: list[float] = [0.0, -1e9]  # the offset (h) and when it was read (monotonic s)


def custom_headers(self: Context, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """``Context._get_custom_headers``: the request's keys that are not Celery's, or None."""
    if len(args) == 1 and type(args[0]) is dict and not kwargs.keys() - CELERY_KEYS:
        # The tracer's call: Context(request, args=..., called_directly=..., kwargs=...).
        request = args[0]
        own = request.keys() - CELERY_KEYS
        return {key: request[key] for key in own} if own else None
    merged: dict[str, Any] = {}
    merged.update(*args, **kwargs)
    own = merged.keys() - CELERY_KEYS
    return {key: merged[key] for key in own} if own else None


def result_repr(
    obj: Any, maxlen: int | None = None, maxlevels: int = 3, seen: set[int] | None = None
) -> str:
    """``saferepr`` as the tracer calls it, with the common results short-cut."""
    kind = type(obj)
    if obj is None or kind is bool or (kind is int and -_INT_BOUND < obj < _INT_BOUND):
        return repr(obj)
    return str(celery_saferepr(obj, maxlen, maxlevels, seen))


def utcoffset() -> float:
    """Celery's ``utcoffset()`` (hours east of UTC, as every event carries it), read at most
    once a minute: it changes only at a daylight-saving switch, and reading it costs a
    ``localtime()`` call per event (the lean path passes this to the event dispatcher)."""
    now = time.monotonic()
    if now - _offset[1] >= 60.0:
        _offset[0], _offset[1] = celery_utcoffset(), now
    return _offset[0]


def install() -> None:
    """Put the three in place in this process (idempotent)."""
    if _original:
        return
    _original["custom_headers"] = Context._get_custom_headers
    _original["saferepr"] = celery_trace.saferepr
    Context._get_custom_headers = custom_headers
    celery_trace.saferepr = result_repr
    for signal in TASK_SIGNALS:
        _original[f"caching:{signal.name}"] = signal.use_caching
        with signal.lock:
            signal.sender_receivers_cache.clear()
            signal.use_caching = True


def cache_publish_receivers() -> None:
    """Turn Celery's per-sender receiver cache on for the publish signals (idempotent)."""
    for signal in PUBLISH_SIGNALS:
        if not signal.use_caching:
            with signal.lock:
                signal.sender_receivers_cache.clear()
                signal.use_caching = True


def uninstall() -> None:
    """Put Celery's own back (tests)."""
    if not _original:
        return
    Context._get_custom_headers = _original.pop("custom_headers")
    celery_trace.saferepr = _original.pop("saferepr")
    for signal in TASK_SIGNALS:
        with signal.lock:
            signal.use_caching = _original.pop(f"caching:{signal.name}")
            signal.sender_receivers_cache.clear()


def lean_enabled(app: Any) -> bool:
    """Whether ``app``'s settings let workers take the lean path (``TASKYARD_LEAN_PATH``)."""
    runtime = find_runtime(app)
    return runtime is None or bool(getattr(runtime.settings, "lean_path", True))


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """``worker_init`` receiver: install in a taskyard worker unless the lean path is off."""
    app = getattr(sender, "app", None)
    if app is not None and lean_enabled(app):
        install()
