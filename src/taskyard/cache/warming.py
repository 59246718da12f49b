"""Cache warmers: ``@cache_warmer`` registers one; ``taskyard.cache.warm`` runs them all.

The warm task runs once per ``cache.warm_interval_s`` cluster-wide (single-flight) and once when
the workers start: every worker asks for a run when it is ready, and the period claim lets only
the first of them through. A warmer returns the number of keys it stored; the run's report (keys
and time per warmer) is kept in ``keys.cache_warm_last``.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import signals

from taskyard.beat import job_interval_s, single_flight
from taskyard.cache.core import Cache, cache_for
from taskyard.config import Settings
from taskyard.errors import ConfigurationError
from taskyard.routing.levels import Priority
from taskyard.runtime import PeriodicJob, Runtime, TaskyardApp, runtime_of

log = logging.getLogger(__name__)

WarmerFn = Callable[[Cache], int]
F = TypeVar("F", bound=WarmerFn)

#: Job name of the warm task's single-flight claim.
WARM_JOB = "cache.warm"
#: The warming task, sent by beat every TASKYARD_CACHE__WARM_INTERVAL_S.
CACHE_WARM_TASK = "taskyard.cache.warm"


@dataclass(frozen=True)
class Warmer:
    """A registered warmer: ``fn(cache) -> keys stored``."""

    name: str
    fn: WarmerFn
    description: str = ""


_REGISTRY: dict[str, Warmer] = {}


def cache_warmer(name: str, *, description: str = "") -> Callable[[F], F]:
    """Register ``fn(cache) -> int`` as the warmer ``name``.

    Raises:
        ConfigurationError: the name is empty or already taken by another function.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(
            f"cache warmer name must be a non-empty string, got {name!r}", value=name
        )

    def register(fn: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualname(existing.fn) != _qualname(fn):
            raise ConfigurationError(
                f"cache warmer {name!r} is already registered by {_qualname(existing.fn)}",
                value=name,
            )
        _REGISTRY[name] = Warmer(name, fn, description or (fn.__doc__ or "").strip())
        return fn

    return register


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def registered_warmers() -> dict[str, Warmer]:
    """The registered warmers by name."""
    return dict(_REGISTRY)


def unregister(name: str) -> None:
    """Remove a warmer (tests and reloads)."""
    _REGISTRY.pop(name, None)


def run_warmers(
    runtime: Runtime,
    names: Iterable[str] | None = None,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run warmers now (all, or ``names``); a failing warmer is reported, the others still run.

    Raises:
        ConfigurationError: ``names`` lists a warmer that is not registered.
    """
    chosen = list(_REGISTRY) if names is None else list(names)
    unknown = [n for n in chosen if n not in _REGISTRY]
    if unknown:
        raise ConfigurationError(
            f"unknown cache warmer(s) {', '.join(unknown)}; registered: "
            f"{', '.join(sorted(_REGISTRY)) or 'none'}",
            value=unknown,
        )
    cache = cache_for(runtime)
    started_at = time.time()
    started = time.perf_counter()
    results = []
    for name in chosen:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name, "keys": 0, "error": None}
        try:
            entry["keys"] = int(_REGISTRY[name].fn(cache))
        except Exception as exc:
            log.error("cache warmer %s failed: %s", name, exc)
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=5)
        entry["duration_s"] = round(time.perf_counter() - t0, 6)
        results.append(entry)
        if progress is not None:
            progress(name, entry)
    cache.flush_stats()
    return {
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 6),
        "keys": sum(r["keys"] for r in results),
        "warmers": results,
        "errors": sum(1 for r in results if r["error"]),
    }


def warm(runtime: Runtime, *, trigger: str = "beat") -> dict[str, Any]:
    """The periodic job: run every warmer once per warm period cluster-wide."""
    period_s = job_interval_s(runtime, CACHE_WARM_TASK)
    with single_flight(runtime, WARM_JOB, period_s, lock_ttl_s=period_s) as flight:
        if not flight.acquired:
            return {**flight.report(), "trigger": trigger}
        report = run_warmers(runtime)
        report.update(trigger=trigger, period=flight.period, skipped=False)
        runtime.redis.set(runtime.keys.cache_warm_last(), json.dumps(report))
        log.info(
            "cache warm (%s): %d keys by %d warmers in %.3f s",
            trigger,
            report["keys"],
            len(report["warmers"]),
            report["duration_s"],
        )
        return report


def last_warm_report(runtime: Runtime) -> dict[str, Any] | None:
    """Report of the last warming run, as a plain dict (None before the first)."""
    raw = runtime.redis.get(runtime.keys.cache_warm_last())
    return None if raw is None else dict(json.loads(raw))


def periodic_jobs(settings: Settings) -> dict[str, PeriodicJob]:
    """Cache warming's periodic job, for beat."""
    return {CACHE_WARM_TASK: PeriodicJob(settings.cache.warm_interval_s)}


def install(app: TaskyardApp, runtime: Runtime) -> None:
    """Register ``taskyard.cache.warm`` and the warm-at-start hook."""

    @app.task(name=CACHE_WARM_TASK, bind=True, shared=False, taskyard_level=Priority.LOW)  # type: ignore[untyped-decorator]
    def warm_task(self: Any, trigger: str = "beat") -> dict[str, Any]:
        return warm(runtime_of(self.app), trigger=trigger)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        sender_app: TaskyardApp | None = getattr(sender, "app", None)
        if sender_app is None or sender_app is not app:
            return
        if not runtime.settings.schedule.warm_on_start or not _REGISTRY:
            return  # disabled, or this app's modules register no warmer: nothing to warm
        try:
            sender_app.send_task(CACHE_WARM_TASK, kwargs={"trigger": "startup"})
        except Exception as exc:  # the worker runs on; the next period warms
            log.warning("cache warm at start not sent: %s", exc)

    signals.worker_ready.connect(on_worker_ready, weak=False)
