"""``taskyard api``: serve the stats API with uvicorn (one worker process)."""

from __future__ import annotations

import click

from taskyard.cli.loader import APP_OPTION, load_app
from taskyard.errors import TaskyardError


@click.command("api")
@APP_OPTION
@click.option(
    "--host", default=None, help="Bind address [default: TASKYARD_MONITORING__API_HOST, 127.0.0.1]."
)
@click.option(
    "--port", type=int, default=None, help="Port [default: TASKYARD_MONITORING__API_PORT, 8000]."
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log every request (costs about a tenth of the throughput).",
)
def api_command(
    app_path: str | None, host: str | None, port: int | None, log_level: str, access_log: bool
) -> None:
    """Serve the stats API, /metrics and the OpenAPI schema with uvicorn."""
    import uvicorn

    from taskyard.monitoring.api.app import create_api

    try:
        api = create_api(load_app(app_path, default_name="taskyard-api"))
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    settings = api.state.taskyard.runtime.settings.monitoring
    uvicorn.run(
        api,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=1,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
