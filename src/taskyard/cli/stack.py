"""``taskyard worker`` and ``taskyard up``: one worker profile, or the whole dev stack."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from taskyard.cli.loader import settings as cli_settings
from taskyard.config import Settings, load_settings
from taskyard.errors import TaskyardError
from taskyard.monitoring.services import dashboard_url, monitoring_services
from taskyard.stack import (
    EmbeddedRedis,
    Service,
    Supervisor,
    celery_argv,
    format_table,
    run_until_signalled,
)
from taskyard.workers.profiles import celery_worker_argv, get_profile

#: Profiles `taskyard up` starts, one worker each: together they consume all five queues.
UP_PROFILES = ("critical", "default", "batch")


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--profile", "-p", default="all", show_default=True,
              help="Worker profile: which queues, in strict priority order.")
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(profile: str, app_path: str, celery_args: tuple[str, ...]) -> None:
    """Run `celery worker` for a profile; extra arguments go to Celery unchanged."""
    settings = cli_settings()
    try:
        chosen = get_profile(settings, profile)
    except TaskyardError as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from None
    argv = celery_argv(*celery_worker_argv(app_path, chosen, celery_args))
    os.execv(argv[0], argv)


def _up_services(app_path: str, settings: Settings, workdir: Path, producer: str | None,
                 beat: bool) -> list[Service]:
    services = []
    for name in UP_PROFILES:
        profile = get_profile(settings, name)
        argv = celery_argv(*celery_worker_argv(app_path, profile, ("--loglevel", "INFO")))
        services.append(Service(f"worker {name}", argv, f"queues {profile.queue_arg}"))
    if beat:
        schedule = str(workdir / "celerybeat-schedule")
        services.append(Service("beat", celery_argv("-A", app_path, "beat", "-s", schedule,
                                                     "--loglevel", "INFO")))
    if producer:
        services.append(Service("producer", [sys.executable, "-m", producer]))
    services.extend(monitoring_services(app_path, settings))
    return services


@click.command()
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.option("--producer", default=None, metavar="MODULE",
              help="Also run `python -m MODULE` (a demo workload) as part of the stack.")
@click.option("--beat/--no-beat", default=True, show_default=True, help="Run Celery beat.")
def up(app_path: str, producer: str | None, beat: bool) -> None:
    """Run a dev stack: Redis (embedded if none), workers, beat, Flower, stats API, dashboard."""
    settings = cli_settings()
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    workdir = Path(tempfile.mkdtemp(prefix="taskyard-up-"))
    if settings.redis_url is None:
        embedded = EmbeddedRedis(directory=str(workdir)).start()
        env["TASKYARD_REDIS_URL"] = embedded.url
        settings = load_settings(redis_url=embedded.url)
    supervisor = Supervisor(env)
    rows = [("service", "pid", "where")]
    if embedded is not None:
        assert embedded.process is not None
        rows.append(("redis (embedded)", str(embedded.process.pid), embedded.url))
    try:
        for service in _up_services(app_path, settings, workdir, producer, beat):
            supervisor.start(service)
            assert service.process is not None
            rows.append((service.name, str(service.process.pid), service.address))
            if service.name == "stats api":
                rows.append(("dashboard", str(service.process.pid), dashboard_url(service)))
        click.echo(f"taskyard up: broker {settings.effective_broker_url}\n")
        click.echo(format_table(rows))
        click.echo("\nPress Ctrl-C to stop everything.", err=True)
        code = run_until_signalled(supervisor)
    finally:
        click.echo("taskyard up: stopping...", err=True)
        supervisor.stop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        click.echo("taskyard up: stopped.", err=True)
    sys.exit(code)
