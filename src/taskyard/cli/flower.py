"""``taskyard flower -A APP``: Flower on the app's broker, behind basic auth."""

from __future__ import annotations

import os
import sys

import click

from taskyard.cli.loader import settings as load_cli_settings
from taskyard.monitoring.flower import (
    FLOWER_AUTH_ENV,
    check_basic_auth,
    flower_args,
    show_app_queues,
)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.option("--port", type=int, default=None,
              help="Port (default: TASKYARD_MONITORING__FLOWER_PORT).")
@click.option("--address", default=None,
              help="Bind address (default: TASKYARD_MONITORING__FLOWER_HOST).")
@click.option("--broker-api", default=None, metavar="URL",
              help="RabbitMQ management API for the Broker tab, e.g. "
                   "http://guest:guest@localhost:15672/api/ (Redis needs none).")
@click.argument("flower_extra", nargs=-1, type=click.UNPROCESSED)
def flower(app_path: str, port: int | None, address: str | None, broker_api: str | None,
           flower_extra: tuple[str, ...]) -> None:
    """Run Flower for an app, with basic auth from settings; extra arguments go to Flower."""
    settings = load_cli_settings()
    auth = check_basic_auth(settings.monitoring.flower_basic_auth)
    if auth:
        os.environ[FLOWER_AUTH_ENV] = auth
    else:
        os.environ.pop(FLOWER_AUTH_ENV, None)
        click.echo("taskyard flower: basic auth is OFF (flower_basic_auth is empty)", err=True)
    show_app_queues()

    from celery.bin.celery import celery as celery_main

    args = flower_args(app_path, settings, port, address, broker_api, flower_extra)
    # Flower parses its own options from sys.argv[0] plus the arguments after "flower".
    sys.argv = ["celery", *args]
    celery_main.main(args=args, prog_name="celery", auto_envvar_prefix="CELERY")
