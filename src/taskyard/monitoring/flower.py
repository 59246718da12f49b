"""``taskyard flower -A APP``: Flower on the app's broker, behind basic auth, showing five queues.

Flower runs in this process (``celery -A APP flower``), so the app's own configuration (broker,
transport options, the five kombu queues) is what Flower sees. Two things are added:

* basic auth from ``MonitoringSettings.flower_basic_auth``, handed over through Flower's
  ``FLOWER_BASIC_AUTH`` environment variable so the password never shows in ``ps``;
* the Broker tab and ``/api/queues/length`` always list the app's queues. Flower only lists the
  queues that live workers consume, so a level whose workers are down (the moment its queue
  grows) would vanish from the view; here it stays, with its length;
* on RabbitMQ without a reachable management API (Flower's only source there), the Broker tab
  falls back to AMQP passive declares: ready messages and consumers per queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from taskyard.config import Settings

#: Flower reads its basic-auth credentials from this variable ("user:password[,user:password]").
FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"

_PATCH_MARK = "_taskyard_app_queues"


def app_queue_names(capp: Any) -> list[str]:
    """Names of the queues an app declares, in declaration order (most urgent level first)."""
    names: list[str] = []
    for queue in capp.conf.task_queues or ():
        if queue.name and queue.name not in names:
            names.append(queue.name)
    default = capp.conf.task_default_queue
    if default and default not in names:
        names.append(default)
    return names


def merge_queue_names(declared: Sequence[str], consumed: Iterable[str]) -> list[str]:
    """The declared queues in their order, then any other queue a worker consumes, sorted."""
    extra = sorted(set(consumed) - set(declared))
    return [*declared, *extra]


def show_app_queues() -> None:
    """Patch this process's Flower: the app's queues always listed, AMQP counts as fallback.

    Idempotent; only affects the current process (the one running Flower).
    """
    import flower.views as flower_views
    from flower.views import BaseHandler

    original: Callable[[Any], list[str]] = BaseHandler.get_active_queue_names
    if getattr(original, _PATCH_MARK, False):
        return

    def get_active_queue_names(self: Any) -> list[str]:
        return merge_queue_names(app_queue_names(self.capp), original(self))

    setattr(get_active_queue_names, _PATCH_MARK, True)
    BaseHandler.get_active_queue_names = get_active_queue_names
    # BaseHandler.get_broker builds its broker through this module-level name.
    flower_views.Broker = _broker_with_amqp_fallback()


def amqp_queue_rows(broker_url: str, names: Sequence[str],
                    timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """Broker-tab rows from AMQP passive declares: ready messages and consumers per queue.

    Unacknowledged messages are not visible over AMQP, so that column stays empty.
    """
    from taskyard.monitoring.queues import amqp_queue_counts

    return [{"name": name, "messages": ready, "messages_ready": ready, "consumers": consumers}
            for name, ready, consumers in amqp_queue_counts(broker_url, names, timeout_s)]


def _broker_with_amqp_fallback() -> Any:
    """A stand-in for Flower's ``Broker`` factory whose RabbitMQ falls back to AMQP counts."""
    from flower.utils.broker import Broker, RabbitMQ

    class RabbitMQWithFallback(RabbitMQ):  # type: ignore[misc]
        def __init__(self, broker_url: str, http_api: str | None, **kwargs: Any) -> None:
            super().__init__(broker_url, http_api, **kwargs)
            self.amqp_url = broker_url

        async def queues(self, names: Sequence[str]) -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = await super().queues(names)
            if rows:
                return rows
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, amqp_queue_rows, self.amqp_url, list(names))

    def factory(broker_url: str, *args: Any, **kwargs: Any) -> Any:
        if broker_url.split("://", 1)[0] in ("amqp", "amqps"):
            return RabbitMQWithFallback(broker_url, *args, **kwargs)
        return Broker(broker_url, *args, **kwargs)

    return factory


def check_basic_auth(value: str) -> str:
    """Validate ``flower_basic_auth``: comma-separated ``user:password`` pairs, or empty (off).

    Raises:
        click.BadParameter: a pair lacks its colon, user or password.
    """
    for pair in filter(None, value.split(",")):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise click.BadParameter(
                f"{pair.split(':')[0]!r}... is not 'user:password'; set "
                "TASKYARD_MONITORING__FLOWER_BASIC_AUTH to user:password[,user:password]",
                param_hint="flower_basic_auth",
            )
    return value


def flower_args(app_path: str, settings: Settings, port: int | None = None,
                address: str | None = None, broker_api: str | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``celery`` that run Flower for ``app_path`` (without the credentials)."""
    monitoring = settings.monitoring
    args = ["-A", app_path, "flower",
            f"--port={port if port is not None else monitoring.flower_port}",
            f"--address={address if address is not None else monitoring.flower_host}"]
    if broker_api:
        args.append(f"--broker_api={broker_api}")
    return [*args, *extra]


def flower_url(settings: Settings) -> str:
    """Address of the Flower that ``taskyard flower`` starts with these settings."""
    host = settings.monitoring.flower_host
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{settings.monitoring.flower_port}/"
