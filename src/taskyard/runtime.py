"""What an app made by :func:`taskyard.create_app` carries: settings, keys, router, Redis.

Subsystems reach these through :func:`runtime_of` (``runtime_of(task.app)``) rather than reading
the environment again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from taskyard.config import Settings
from taskyard.errors import ConfigurationError
from taskyard.keys import Keys

if TYPE_CHECKING:
    from taskyard.routing.rules import Router

_ATTRIBUTE = "_taskyard_runtime"


@dataclass
class Runtime:
    """Per-app state shared by every subsystem."""

    settings: Settings
    keys: Keys
    router: Router
    _redis: redis.Redis | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def redis(self) -> redis.Redis:
        """Client for buffers, cache and stats. redis-py rebuilds its pool after a fork, so one
        client per process is safe under prefork."""
        if self._redis is None:
            with self._lock:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(
                        self.settings.effective_redis_url,
                        socket_connect_timeout=self.settings.broker_connect_timeout_s,
                        health_check_interval=30,
                    )
        return self._redis


def attach(app: Any, runtime: Runtime) -> None:
    setattr(app, _ATTRIBUTE, runtime)


def runtime_of(app: Any) -> Runtime:
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
