"""Worker profiles: named sets of queues, consumed in strict priority order."""

from __future__ import annotations

from dataclasses import dataclass

from taskyard.config import Settings
from taskyard.errors import ConfigurationError
from taskyard.routing.levels import Priority, order_levels


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    """A profile: its name and its queues, most urgent first."""

    name: str
    queues: tuple[Priority, ...]

    @property
    def queue_arg(self) -> str:
        """The ``-Q`` value: queues in strict priority order."""
        return ",".join(level.value for level in self.queues)

    @property
    def node_name(self) -> str:
        """Celery node name that says which profile a worker runs."""
        return f"{self.name}@%h"


def get_profile(settings: Settings, name: str) -> WorkerProfile:
    """The profile called ``name``.

    Raises:
        ConfigurationError: no such profile (the message lists the known ones).
        RoutingError: the profile lists an unknown queue.
    """
    try:
        queues = settings.worker_profiles[name]
    except KeyError:
        known = ", ".join(sorted(settings.worker_profiles))
        raise ConfigurationError(
            f"unknown worker profile {name!r}; known profiles: {known}", value=name
        ) from None
    return WorkerProfile(name, tuple(order_levels(queues)))


def celery_worker_argv(app: str, profile: WorkerProfile, extra: tuple[str, ...] = ()) -> list[str]:
    """Arguments of the ``celery worker`` command that runs ``profile`` for ``app``."""
    argv = ["-A", app, "worker", "-Q", profile.queue_arg, "-n", profile.node_name, "-O", "fair"]
    return [*argv, *extra]
