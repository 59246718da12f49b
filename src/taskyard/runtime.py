"""What an app made by :func:`taskyard.create_app` carries: settings, keys, router, Redis, and
the per-app services of the subsystems (guard, metric capture, sent events, database engines).

Subsystems reach these through :func:`runtime_of` (``runtime_of(task.app)``) rather than reading
the environment again. :func:`current_taskyard_app` is the app taskyard's decorators use.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias

import redis
from celery import Celery, _state

from taskyard.config import Settings, redis_client_url
from taskyard.errors import ConfigurationError
from taskyard.keys import Keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from taskyard.routing.rules import Router

from taskyard.seams import Seam

# Library internals this module relies on (checked by tests/test_seams.py): redis-py's pool
# locks and the pool's event dispatcher (renewed after fork) and Celery's thread-local current
# app.
SEAMS = (
    Seam("redis.connection.ConnectionPool", "_fork_lock", "instance"),
    Seam("redis.connection.ConnectionPool", "_lock", "instance"),
    Seam("redis.connection.ConnectionPool", "_event_dispatcher", "instance"),
    Seam("redis.connection.ConnectionPool", "_checkpid"),
    Seam("redis.event.EventDispatcher", "_lock", "instance"),
    Seam("celery._state", "_tls", "attribute"),
    Seam("celery._state", "default_app", "attribute"),
)
#: A Celery app made by :func:`taskyard.create_app` (a ``taskyard.app.TaskyardCelery``), as
#: annotations name it. Celery ships no type stubs, so to mypy this is ``Any``; the alias says to
#: a reader which object it is, and is the one place to narrow once Celery is typed.
TaskyardApp: TypeAlias = Celery

_ATTRIBUTE = "_taskyard_runtime"
#: The taskyard app created last in this process (a weak reference: apps of finished tests go).
_latest: weakref.ref[TaskyardApp] | None = None
#: Connection pools of the clients made by :func:`redis_client`: a forked child renews their
#: locks (:func:`_renew_pool_locks`).
_pools: weakref.WeakSet[redis.ConnectionPool] = weakref.WeakSet()
#: The locks a pooled command takes (redis-py 8), by the name a test forks with each held: the
#: pool's own two (``_checkpid``, every checkout and release) and its event dispatcher's (every
#: release dispatches an event). redis-py renews the maintenance handler's lock after a fork
#: itself; the HIMPORT registry's is taken only by HIMPORT commands, which taskyard does not send.
POOL_LOCKS: dict[str, Callable[[redis.ConnectionPool], tuple[Any, str]]] = {
    "_lock": lambda pool: (pool, "_lock"),
    "_fork_lock": lambda pool: (pool, "_fork_lock"),
    "event dispatcher": lambda pool: (getattr(pool, "_event_dispatcher", None), "_lock"),
}
_RLOCK = type(threading.RLock())


#: The app whose task is being sent right now (set by the app's send_task and by fast
#: publishing), so receivers of publish signals know the sending app.
sending_app: ContextVar[TaskyardApp | None] = ContextVar("taskyard_sending_app", default=None)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """``redis.Redis.from_url(url, **options)``, usable in a child forked at any moment.

    A worker's main process uses its clients from several threads (batch reaper, metric flush,
    sent events) while the prefork pool forks replacement processes from its main thread; a
    child must not inherit a pool lock that one of those threads held (see
    :func:`_renew_pool_locks`).
    """
    client = redis.Redis.from_url(url, **options)
    _pools.add(client.connection_pool)
    return client


def _renew_pool_locks() -> None:
    # Relies on redis-py's ConnectionPool (redis/connection.py, 5.x-8.x): a pool used in a
    # forked child is rebuilt there by _checkpid(), which takes _fork_lock and calls reset(); in
    # redis-py 8 reset() and get_connection() take _lock, which is created once in __init__,
    # and release() dispatches an event under the pool's EventDispatcher lock. Those are the
    # parent's lock objects. get_connection() holds _lock while it builds a connection (redis-py
    # 8 reads its own package metadata from disk then, ms of I/O), and every command's release
    # holds both, so a fork from another thread at such a moment leaves a lock held in the child
    # by a thread that does not exist there: the child's first command on the pool blocks for
    # good (a prefork pool process replacing a crashed one hung so, and with it its worker's
    # only process). Here, right after the fork, only the forking thread runs: fresh locks are
    # safe, and redis-py's own rebuild then runs on them. SEAMS declares the locks
    # (tests/test_seams.py); tests/test_runtime_fork.py forks with each one held.
    for pool in list(_pools):
        for where in POOL_LOCKS.values():
            holder, name = where(pool)
            lock = getattr(holder, name, None)
            if lock is not None:
                fresh = threading.RLock() if type(lock) is _RLOCK else threading.Lock()
                setattr(holder, name, fresh)


os.register_at_fork(after_in_child=_renew_pool_locks)


class PeriodicJob(NamedTuple):
    """A periodic job a part declares (by its task name); :mod:`taskyard.beat` schedules it."""

    #: The period (s) from the part's own setting; TASKYARD_SCHEDULE__INTERVALS_S overrides it.
    period_s: float
    #: False: beat sends it only when TASKYARD_SCHEDULE__INTERVALS_S names it.
    scheduled: bool = True


# The per-app services live in packages above the runtime, which must not import them
# (tests/test_layers.py). Each slot is typed by a Protocol of what its users call; mypy checks
# the real class against it where the installer assigns it.


class FastPublisher(Protocol):
    """Fast ``.delay()`` of an app's tasks: ``taskyard.broker.publish.Publisher``."""

    def send(
        self,
        task: Any,
        args: Any,
        kwargs: Any,
        task_id: str | None,
        queue: str | None,
        extra_headers: dict[str, Any] | None = None,
    ) -> Any:
        """Publish like ``task.apply_async(args, kwargs, task_id=...)`` and return its
        ``AsyncResult``; None when the call does not fit the fast path (nothing was done).
        ``extra_headers``: taskyard's own message headers (job control's lock)."""
        ...

    def close(self) -> None:
        """Close this process's broker connection."""
        ...


class SentEventBuffer(Protocol):
    """Batched task-sent events: ``taskyard.monitoring.events.SentEvents``."""

    def add(self, headers: dict[str, Any], exchange: str, routing_key: str) -> None:
        """Buffer the task-sent event of one published message."""
        ...

    def close(self) -> None:
        """Publish what is buffered and stop the publishing thread."""
        ...


class MetricCapture(Protocol):
    """Per-process metric capture: ``taskyard.monitoring.capture.Capture``."""

    #: The task id a lean handler records itself, between run_started and run_finished.
    direct: str | None

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
        """A task received and started at ``at`` (the lean path): its counters, its wait
        (from ``headers``) and its timeline steps."""
        ...

    def run_finished(
        self,
        task_id: str,
        name: str,
        queue: str,
        worker: str,
        state: str | None,
        runtime_s: float,
    ) -> None:
        """The end of that run in Celery's ``state``."""
        ...

    def flush(self) -> int:
        """Write what was counted to Redis in one round trip; returns the fields written."""
        ...

    def close(self) -> None:
        """Flush what is buffered and stop the flusher thread (at process exit)."""
        ...


class ResourceGuard(Protocol):
    """Resource guard of a worker: ``taskyard.workers.guards.Guard``."""

    def on_consumer_start(self, consumer: Any) -> None:
        """Bind to the worker's consumer (its queues, its timer)."""
        ...

    @property
    def valve_interval_s(self) -> float | None:
        """Seconds between :meth:`valve_tick` calls; None without a back-pressure valve."""
        ...

    def valve_tick(self, consumer: Any) -> None:
        """Pause or resume the consumer's queues from the latest reading."""
        ...

    def on_consumer_shutdown(self) -> None:
        """Let go of the consumer when the worker stops."""
        ...


@dataclass
class Runtime:
    """Per-app state shared by every subsystem."""

    settings: Settings
    keys: Keys
    router: Router
    #: Resource guard, metric capture and task-sent event buffer of this app: set by their
    #: installers, None when not installed.
    guard: ResourceGuard | None = None
    capture: MetricCapture | None = None
    sent_events: SentEventBuffer | None = None
    #: Fast ``.delay()`` of the app's tasks: set by create_app on taskyard's Redis transport,
    #: None elsewhere (Celery's path).
    publisher: FastPublisher | None = None
    #: The parts' periodic jobs by task name (create_app collects them before any part installs).
    periodic_jobs: dict[str, PeriodicJob] = field(default_factory=dict, repr=False)
    #: The flow-control store on the broker's Redis (a taskyard.flow.FlowStore, made on first
    #: use): typed loosely because the runtime sits below the flow part and does not import it.
    flow_store: Any = field(default=None, repr=False)
    #: Job control of this app (a taskyard.broker.control.service.JobControl: cancel records,
    #: unique locks, progress), set by its installer on taskyard's Redis transport; None
    #: elsewhere. Typed loosely for the same reason.
    jobs: Any = field(default=None, repr=False)
    #: SQLAlchemy engines of this app per database URL (taskyard.database), per process.
    engines: dict[str, Engine] = field(default_factory=dict, repr=False)
    #: The batch reaper's cache of registered batch definitions (taskyard.batching.reaper):
    #: batch name -> (monotonic time read, definition as stored in Redis).
    batch_definitions: dict[str, tuple[float, dict[str, str]]] = field(
        default_factory=dict, repr=False
    )
    _redis: redis.Redis | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def redis(self) -> redis.Redis:
        """Client for buffers, cache and stats. redis-py rebuilds its pool after a fork, on fresh
        locks (:func:`redis_client`), so one client per process is safe under prefork."""
        if self._redis is None:
            with self._lock:
                if self._redis is None:
                    self._redis = redis_client(
                        redis_client_url(self.settings.effective_redis_url),
                        socket_connect_timeout=self.settings.broker_connect_timeout_s,
                        health_check_interval=30,
                    )
        return self._redis


def attach(app: TaskyardApp, runtime: Runtime) -> None:
    """Make ``runtime`` the runtime of ``app``, and ``app`` the taskyard app created last."""
    global _latest
    setattr(app, _ATTRIBUTE, runtime)
    _latest = weakref.ref(app)


def find_runtime(app: TaskyardApp) -> Runtime | None:
    """The runtime of ``app``, or None when ``create_app`` did not make it."""
    return getattr(app, _ATTRIBUTE, None)


def is_taskyard_app(app: TaskyardApp) -> bool:
    """Whether ``app`` was made by ``taskyard.create_app``."""
    return getattr(app, _ATTRIBUTE, None) is not None


def current_taskyard_app() -> TaskyardApp:
    """The taskyard app that taskyard's decorators use now, in any thread.

    This thread's current Celery app when ``create_app`` made it, else the taskyard app created
    last: a plain ``Celery()`` created later (it becomes Celery's current app) and a thread that
    never called ``set_default()`` still get the taskyard app.

    Raises:
        ConfigurationError: no taskyard app exists in this process.
    """
    # Celery internals: _tls.current_app is the thread's current app (None in a new thread) and
    # default_app the process default; read directly because get_current_app() would create a
    # fallback plain app.
    app = getattr(_state._tls, "current_app", None) or _state.default_app
    if app is not None and getattr(app, _ATTRIBUTE, None) is not None:
        return app
    latest = _latest() if _latest is not None else None
    if latest is None:
        raise ConfigurationError(
            "no taskyard app in this process: create one with taskyard.create_app(...) before "
            "sending taskyard tasks"
        )
    return latest


def runtime_of(app: TaskyardApp) -> Runtime:
    """The runtime of an app made by ``create_app``.

    Raises:
        ConfigurationError: the app was not made by ``taskyard.create_app``.
    """
    runtime = getattr(app, _ATTRIBUTE, None)
    if runtime is None:
        raise ConfigurationError(
            f"app {getattr(app, 'main', app)!r} was not made by taskyard.create_app"
        )
    return runtime  # type: ignore[no-any-return]
