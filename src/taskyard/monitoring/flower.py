"""``taskyard flower -A APP``: Flower on the app's broker, behind basic auth, showing five queues.

Flower runs in this process (``celery -A APP flower``), so the app's own configuration (broker,
transport options, the five kombu queues) is what Flower sees. Added to it:

* basic auth from ``MonitoringSettings.flower_basic_auth`` (or generated credentials when none
  are configured), handed over through Flower's ``FLOWER_BASIC_AUTH`` environment variable so the
  password never shows in ``ps``;
* every route needs those credentials: Flower itself checks them only on its pages and API, and
  answers ``/metrics`` (task names, worker hostnames), ``/healthcheck`` and its static files to
  anyone (:func:`require_auth_on_every_route`);
* the Broker tab and ``/api/queues/length`` always list the app's queues. Flower only lists the
  queues that live workers consume, so a level whose workers are down (the moment its queue
  grows) would vanish from the view; here it stays, with its length;
* on RabbitMQ without a reachable management API (Flower's only source there), the Broker tab
  falls back to AMQP passive declares: ready messages and consumers per queue.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from taskyard.config import Settings
from taskyard.seams import Seam

# Flower internals the patches rely on (checked by tests/test_seams.py; the patched behaviour
# against a real Flower by tests/monitoring/test_flower.py).
SEAMS = (
    Seam("flower.views.BaseHandler", "get_active_queue_names"),
    Seam("flower.views.BaseHandler", "get_current_user"),
    Seam("flower.views.BaseHandler", "prepare"),
    Seam("flower.views", "BaseHandler", "class"),
    Seam("flower.urls", "handlers", "attribute"),
)

#: Flower reads its basic-auth credentials from this variable ("user:password[,user:password]").
FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"

_PATCH_MARK = "_taskyard_app_queues"
_AUTH_MARK = "_taskyard_auth_everywhere"
#: User name of generated credentials.
GENERATED_USER = "admin"


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


def amqp_queue_rows(
    broker_url: str, names: Sequence[str], timeout_s: float = 2.0
) -> list[dict[str, Any]]:
    """Broker-tab rows from AMQP passive declares: ready messages and consumers per queue.

    Unacknowledged messages are not visible over AMQP, so that column stays empty.
    """
    from taskyard.monitoring.queues import amqp_queue_counts

    return [
        {"name": name, "messages": ready, "messages_ready": ready, "consumers": consumers}
        for name, ready, consumers in amqp_queue_counts(broker_url, names, timeout_s)
    ]


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
        scheme, _, rest = broker_url.partition("://")
        if scheme in ("amqp", "amqps"):
            return RabbitMQWithFallback(broker_url, *args, **kwargs)
        if scheme.startswith("taskyard."):
            # taskyard's own Redis transport ("taskyard.broker...:Transport://host:port/db")
            # keeps kombu's Redis queue layout, which Flower's Redis reader understands.
            broker_url = f"redis://{rest}"
        return Broker(broker_url, *args, **kwargs)

    return factory


def check_basic_auth(value: str) -> str:
    """Validate ``flower_basic_auth``: comma-separated ``user:password`` pairs.

    Raises:
        click.BadParameter: a pair lacks its colon, user or password, or there is none.
    """
    pairs = [pair for pair in value.split(",") if pair]
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise click.BadParameter(
                f"{pair.split(':')[0]!r}... is not 'user:password'; set "
                "TASKYARD_MONITORING__FLOWER_BASIC_AUTH to user:password[,user:password]",
                param_hint="flower_basic_auth",
            )
    if not pairs:
        raise click.BadParameter(
            f"{value!r} holds no 'user:password' pair; unset "
            "TASKYARD_MONITORING__FLOWER_BASIC_AUTH to have a password generated",
            param_hint="flower_basic_auth",
        )
    return value


def generate_basic_auth(user: str = GENERATED_USER) -> str:
    """Fresh ``user:password`` credentials: 128 random bits, URL-safe."""
    return f"{user}:{secrets.token_urlsafe(16)}"


def credentials_match(header: str | None, allowed: Sequence[str]) -> bool:
    """Whether an ``Authorization`` header carries one of the ``user:password`` pairs.

    Compared in constant time, like Flower's own check.
    """
    scheme, _, token = (header or "").partition(" ")
    if scheme != "Basic" or not token:
        return False
    try:
        given = base64.b64decode(token.strip(), validate=True)
    except ValueError:
        return False
    return any(hmac.compare_digest(given, pair.encode()) for pair in allowed)


def require_auth_on_every_route() -> None:
    """Patch this process's Flower so every request needs the basic-auth credentials.

    Relies on Flower internals (flower 2.x, tested in tests/monitoring/test_flower.py against a real
    Flower): all of its handlers, ``Metrics`` and ``Healthcheck`` included, derive from
    ``flower.views.BaseHandler``, whose ``get_current_user`` checks basic auth but runs only for
    ``@tornado.web.authenticated`` methods; static files are served by tornado's
    ``StaticFileHandler``, once from ``flower.urls.handlers`` and once from the application's
    ``static_path`` setting. The check runs in ``prepare`` (before every method) of
    ``BaseHandler`` and of every Flower class that overrides it (the API's base does), and in a
    static handler class put in both places. Idempotent; no-op when no credentials are
    configured.
    """
    import flower.urls as flower_urls
    import tornado.web
    from flower.views import BaseHandler

    if getattr(BaseHandler.prepare, _AUTH_MARK, False):
        return

    def allowed(handler: tornado.web.RequestHandler) -> list[str]:
        options = getattr(handler.application, "options", None)
        return list(getattr(options, "basic_auth", None) or [])

    def authorized(handler: tornado.web.RequestHandler) -> bool:
        pairs = allowed(handler)
        return not pairs or credentials_match(handler.request.headers.get("Authorization"), pairs)

    def refuse(handler: tornado.web.RequestHandler) -> bool:
        """Answer 401 unless the request carries the credentials; True when refused."""
        if authorized(handler):
            return False
        handler.set_status(401)
        handler.set_header("WWW-Authenticate", 'Basic realm="flower"')
        handler.finish("Access denied")
        return True

    def guarded(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def prepare(self: Any) -> Any:
            if refuse(self):
                return None
            return original(self)

        setattr(prepare, _AUTH_MARK, True)
        return prepare

    classes: set[type[tornado.web.RequestHandler]] = {BaseHandler}
    for entry in flower_urls.handlers:
        handler_class = getattr(entry, "handler_class", None) or entry[1]
        classes.update(
            c
            for c in handler_class.__mro__
            if c.__module__.startswith("flower.") and "prepare" in vars(c)
        )
    for cls in classes:
        cls.prepare = guarded(  # type: ignore[method-assign,assignment]
            vars(cls).get("prepare", tornado.web.RequestHandler.prepare)
        )

    class AuthStaticFileHandler(tornado.web.StaticFileHandler):
        """Flower's static files, behind the same credentials as its pages."""

        def check_xsrf_cookie(self) -> None:
            # Tornado checks the XSRF cookie of a POST before prepare: answer 401, not 403.
            if not authorized(self):
                raise tornado.web.HTTPError(401)
            super().check_xsrf_cookie()

        def write_error(self, status_code: int, **kwargs: Any) -> None:
            if status_code != 401:
                super().write_error(status_code, **kwargs)
                return
            self.set_header("WWW-Authenticate", 'Basic realm="flower"')
            self.finish("Access denied")

        def prepare(self) -> None:
            refuse(self)

    # Flower's app reads this same list object (imported as default_handlers) when it starts.
    for i, entry in enumerate(flower_urls.handlers):
        if isinstance(entry, tuple) and entry[1] is tornado.web.StaticFileHandler:
            flower_urls.handlers[i] = (entry[0], AuthStaticFileHandler, *entry[2:])
    flower_urls.settings["static_handler_class"] = AuthStaticFileHandler


def flower_args(
    app_path: str,
    settings: Settings,
    port: int | None = None,
    address: str | None = None,
    broker_api: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments of ``celery`` that run Flower for ``app_path`` (without the credentials)."""
    monitoring = settings.monitoring
    args = [
        "-A",
        app_path,
        "flower",
        f"--port={port if port is not None else monitoring.flower_port}",
        f"--address={address if address is not None else monitoring.flower_host}",
    ]
    if broker_api:
        args.append(f"--broker_api={broker_api}")
    return [*args, *extra]


def flower_url(settings: Settings) -> str:
    """Address of Flower as a browser reaches it: ``flower_url``, or the one ``taskyard flower``
    binds with these settings."""
    if settings.monitoring.flower_url:
        return settings.monitoring.flower_url.rstrip("/") + "/"
    host = settings.monitoring.flower_host
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    return f"http://{shown}:{settings.monitoring.flower_port}/"
