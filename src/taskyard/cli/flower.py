"""``taskyard flower -A APP``: Flower on the app's broker, every route behind basic auth."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable

import click

from taskyard.cli.loader import announce_redis
from taskyard.cli.loader import settings as load_cli_settings
from taskyard.config import ENV_PREFIX, NESTED_DELIMITER
from taskyard.devstack import stackfile
from taskyard.monitoring.flower import (
    FLOWER_AUTH_ENV,
    check_basic_auth,
    flower_args,
    flower_url,
    generate_basic_auth,
    require_auth_on_every_route,
    show_app_queues,
)

#: The setting's variable, as the stack file records it.
AUTH_VARIABLE = f"{ENV_PREFIX}MONITORING{NESTED_DELIMITER}FLOWER_BASIC_AUTH"


def record_generated(auth: str, url: str) -> tuple[stackfile.StackFile, Callable[[], None]]:
    """Put generated credentials in the stack file here: the running stack's, or a new one.

    Returns the stack and a callable that takes back what was written: the file removed if
    this process made it, else the running stack's entries put back as they were.
    """
    path = stackfile.stack_path()
    try:
        stack = stackfile.read(path)
    except stackfile.StackFileError:
        stack = None
    made = stack is None or not stack.alive
    if stack is None or not stack.alive:
        stack = stackfile.new(path, {}, {})
    before_auth = stack.env.get(AUTH_VARIABLE)
    before_url = stack.urls.get("flower")
    stack.env[AUTH_VARIABLE] = auth
    stack.urls["flower"] = url
    stackfile.write(stack)

    def take_back() -> None:
        if made:
            stackfile.remove_if_owned(path, os.getpid())
            return
        with contextlib.suppress(stackfile.StackFileError, OSError):
            current = stackfile.read(path)
            # Only the entries still as this process wrote them: the stack may have moved on.
            if current is None or current.env.get(AUTH_VARIABLE) != auth:
                return
            _put_back(current.env, AUTH_VARIABLE, before_auth)
            _put_back(current.urls, "flower", before_url)
            stackfile.write(current)

    return stack, take_back


def _put_back(entries: dict[str, str], key: str, value: str | None) -> None:
    if value is None:
        entries.pop(key, None)
    else:
        entries[key] = value


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.option(
    "--port", type=int, default=None, help="Port (default: TASKYARD_MONITORING__FLOWER_PORT)."
)
@click.option(
    "--address", default=None, help="Bind address (default: TASKYARD_MONITORING__FLOWER_HOST)."
)
@click.option(
    "--broker-api",
    default=None,
    metavar="URL",
    help="RabbitMQ management API for the Broker tab, e.g. "
    "http://guest:guest@localhost:15672/api/ (Redis needs none).",
)
@click.argument("flower_extra", nargs=-1, type=click.UNPROCESSED)
def flower(
    app_path: str,
    port: int | None,
    address: str | None,
    broker_api: str | None,
    flower_extra: tuple[str, ...],
) -> None:
    """Run Flower for an app behind basic auth; extra arguments go to Flower.

    Without configured credentials a password is generated, printed once and written to the
    stack file.
    """
    settings = load_cli_settings()
    announce_redis(settings, check_data=False)
    configured = settings.monitoring.flower_basic_auth
    if configured is None:
        auth = generate_basic_auth()
        url = flower_url(settings) if port is None else f"http://127.0.0.1:{port}/"
        stack, take_back = record_generated(auth, url)
        # Flower turns SIGTERM into SystemExit and SIGINT is KeyboardInterrupt, so the finally
        # below runs on either; atexit covers an exit from inside Flower's own code.
        atexit.register(take_back)
        user, _, password = auth.partition(":")
        click.echo(
            f"taskyard flower: no credentials configured; generated user {user} password "
            f"{password} (kept in {stack.path}; set {AUTH_VARIABLE} to choose them)",
            err=True,
        )
    else:
        auth = check_basic_auth(configured)
    os.environ[FLOWER_AUTH_ENV] = auth
    show_app_queues()
    require_auth_on_every_route()

    from celery.bin.celery import celery as celery_main

    args = flower_args(app_path, settings, port, address, broker_api, flower_extra)
    # Flower parses its own options from sys.argv[0] plus the arguments after "flower".
    sys.argv = ["celery", *args]
    try:
        celery_main.main(args=args, prog_name="celery", auto_envvar_prefix="CELERY")
    finally:
        if configured is None:
            take_back()
