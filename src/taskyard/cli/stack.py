"""``taskyard worker`` and ``taskyard up``: one worker profile, or the whole dev stack."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from taskyard.broker.memory import check_eviction
from taskyard.cli.flower import AUTH_VARIABLE
from taskyard.cli.loader import announce_redis
from taskyard.cli.loader import settings as cli_settings
from taskyard.cli.output import echo
from taskyard.config import ENV_PREFIX, NESTED_DELIMITER, Settings, load_settings
from taskyard.devstack import stackfile
from taskyard.devstack.services import api_base_url, dashboard_url, monitoring_services
from taskyard.devstack.supervisor import (
    EmbeddedRedis,
    Service,
    Supervisor,
    celery_argv,
    format_table,
    run_until_signalled,
)
from taskyard.errors import TaskyardError
from taskyard.monitoring.flower import generate_basic_auth
from taskyard.workers.profiles import (
    FAST,
    celery_worker_argv,
    get_profile,
    launch_fast,
    worker_env_additions,
    worker_environ,
)

#: Profiles `taskyard up` starts, one worker each: together they consume all five queues.
UP_PROFILES = ("critical", "default", "batch")
#: The admin token's variable, as the stack file records it.
TOKEN_VARIABLE = f"{ENV_PREFIX}MONITORING{NESTED_DELIMITER}API_TOKEN"


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option(
    "--profile",
    "-p",
    default="all",
    show_default=True,
    help="Worker profile: which queues, in strict priority order.",
)
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(profile: str, app_path: str, celery_args: tuple[str, ...]) -> None:
    """Run `celery worker` for a profile; extra arguments go to Celery unchanged."""
    settings = cli_settings()
    announce_redis(settings, check_data=False)
    if profile == FAST:
        try:
            sys.exit(launch_fast(app_path, settings, celery_args))
        except TaskyardError as exc:
            raise click.UsageError(str(exc)) from None
    try:
        chosen = get_profile(settings, profile)
    except TaskyardError as exc:
        raise click.BadParameter(str(exc), param_hint="--profile") from None
    argv = celery_argv(*celery_worker_argv(app_path, chosen, celery_args))
    os.execve(argv[0], argv, worker_environ(argv))


def _absolute_sqlite(url: str) -> str:
    """A relative SQLite URL made absolute, so a shell in another directory opens the same file."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


#: Where `taskyard up` writes its services' logs (in the directory it runs in).
LOG_DIR = Path(".taskyard-logs")
#: How long `taskyard up` waits for its services to serve before it prints the addresses (s).
READY_WAIT_S = 45.0


def _followed(supervisor: Supervisor, name: str | None) -> Callable[[], None] | None:
    """A tick that prints what the followed service's log gained since the last tick."""
    if name is None:
        return None
    chosen = [s for s in supervisor.services if s.name == name]
    if not chosen or chosen[0].log is None:
        known = ", ".join(repr(s.name) for s in supervisor.services)
        raise click.BadParameter(f"no service {name!r}; services: {known}", param_hint="--follow")
    log = chosen[0].log
    position = 0

    def tick() -> None:
        nonlocal position
        try:
            with log.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
        except OSError:
            return
        for line in chunk.decode(errors="replace").splitlines():
            echo(f"[{name}] {line}", lines=False)

    return tick


def _up_services(
    app_path: str, settings: Settings, workdir: Path, producer: str | None, beat: bool
) -> list[Service]:
    services = []
    for name in UP_PROFILES:
        profile = get_profile(settings, name)
        argv = celery_argv(*celery_worker_argv(app_path, profile, ("--loglevel", "INFO")))
        services.append(
            Service(
                f"worker {name}",
                argv,
                f"queues {profile.queue_arg}",
                env=worker_env_additions(argv, os.environ),
                ready_text=" ready.",
            )
        )
    if beat:
        schedule = str(workdir / "celerybeat-schedule")
        services.append(
            Service(
                "beat",
                celery_argv("-A", app_path, "beat", "-s", schedule, "--loglevel", "INFO"),
                ready_text="beat: Starting...",
            )
        )
    if producer:
        services.append(Service("producer", [sys.executable, "-m", producer]))
    services.extend(monitoring_services(app_path, settings))
    return services


@click.command()
@click.option("-A", "--app", "app_path", required=True, help="Celery app, as for `celery -A`.")
@click.option(
    "--producer",
    default=None,
    metavar="MODULE",
    help="Also run `python -m MODULE` (a demo workload) as part of the stack.",
)
@click.option("--beat/--no-beat", default=True, show_default=True, help="Run Celery beat.")
@click.option(
    "--logs",
    "log_dir",
    default=LOG_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the services' logs, one file each.",
)
@click.option(
    "--follow",
    "follow",
    default=None,
    metavar="NAME",
    help="Also print one service's log here as it grows (e.g. 'worker critical', 'beat').",
)
def up(app_path: str, producer: str | None, beat: bool, log_dir: Path, follow: str | None) -> None:
    """Run a dev stack: Redis (embedded if none), workers, beat, Flower, stats API, dashboard.

    Each service writes its log to its own file (--logs); this terminal shows one line per
    service once it serves, then the addresses and credentials. Writes .taskyard-stack.json
    here, so `taskyard` commands in this directory find the stack.
    """
    settings = cli_settings()
    path = stackfile.stack_path()
    try:
        running = stackfile.read(path)
    except stackfile.StackFileError:
        running = None  # a broken file is replaced
    if running is not None and running.alive and running.pid != os.getpid():
        raise click.ClickException(
            f"a stack already runs from this directory (pid {running.pid}, {path.name}); "
            "stop it first or start this one in another directory"
        )
    env = dict(os.environ)
    # What a second shell needs, as variables; credentials are generated when none are set.
    recorded: dict[str, str] = {}
    generated: list[str] = []
    embedded: EmbeddedRedis | None = None
    workdir = Path(tempfile.mkdtemp(prefix="taskyard-up-"))
    overrides: dict[str, object] = {}
    if settings.redis_url is None:
        embedded = EmbeddedRedis(directory=str(workdir)).start()
        overrides["redis_url"] = embedded.url
    monitoring: dict[str, object] = {}
    # Credentials the user configured are recorded but never echoed back.
    configured_secrets = []
    if settings.monitoring.flower_basic_auth is None:
        monitoring["flower_basic_auth"] = generate_basic_auth()
        generated.append("Flower password")
    else:
        configured_secrets.append(AUTH_VARIABLE)
    if settings.monitoring.api_token is None:
        monitoring["api_token"] = secrets.token_urlsafe(24)
        generated.append("API token")
    else:
        configured_secrets.append(TOKEN_VARIABLE)
    if monitoring:
        overrides["monitoring"] = monitoring
    if overrides:
        settings = load_settings(**overrides)
    if settings.result_backend is None:
        # A dev stack stores results, so `add.delay(2, 3).get()` answers in a shell here.
        settings = load_settings(**overrides, result_backend=settings.effective_redis_url)
    recorded[f"{ENV_PREFIX}REDIS_URL"] = settings.effective_redis_url
    recorded[f"{ENV_PREFIX}BROKER_URL"] = settings.effective_broker_url
    recorded[f"{ENV_PREFIX}DATABASE_URL"] = _absolute_sqlite(settings.database_url)
    recorded[f"{ENV_PREFIX}NAMESPACE"] = settings.namespace
    recorded[f"{ENV_PREFIX}RESULT_BACKEND"] = str(settings.result_backend)
    recorded[AUTH_VARIABLE] = str(settings.monitoring.flower_basic_auth)
    recorded[TOKEN_VARIABLE] = str(settings.monitoring.api_token)
    env.update(recorded)
    try:
        # Workers would refuse an evicting Redis one by one; the stack says it once, first.
        check_eviction(settings)
    except TaskyardError:
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    supervisor = Supervisor(env, log_dir=log_dir.resolve())
    rows = [("service", "pid", "where")]
    if embedded is not None:
        assert embedded.process is not None
        rows.append(("redis (embedded)", str(embedded.process.pid), embedded.url))
    urls: dict[str, str] = {}
    try:
        for service in _up_services(app_path, settings, workdir, producer, beat):
            supervisor.start(service)
            assert service.process is not None
            address = service.address
            if service.name == "flower":
                urls["flower"] = service.address
                user = str(settings.monitoring.flower_basic_auth).partition(":")[0]
                address += f"  (user {user})"
            rows.append((service.name, str(service.process.pid), address))
            if service.name == "stats api":
                base = api_base_url(service)
                urls.update(
                    api=base + "/api/v1/overview",
                    docs=base + "/docs",
                    metrics=base + "/metrics",
                    dashboard=dashboard_url(service),
                )
                rows.append(("dashboard", str(service.process.pid), dashboard_url(service)))
        followed = _followed(supervisor, follow)
        click.echo(f"taskyard up: logs in {supervisor.log_dir}/ (one file per service)")

        def announce(service: Service, seconds: float) -> None:
            click.echo(f"  ready  {service.name:<16} after {seconds:4.1f} s")

        late = supervisor.wait_ready(READY_WAIT_S, announce)
        for service in late:
            state = (
                "exited"
                if service.process and service.process.poll() is not None
                else "still starting"
            )
            click.echo(f"  {state}  {service.name:<16} see {service.log}", err=True)
        stack = stackfile.new(path, recorded, urls, app=app_path)
        stackfile.write(stack)
        click.echo(f"\ntaskyard up: broker {settings.effective_broker_url}\n")
        click.echo(format_table(rows))
        click.echo(f"\nStack file: {path} (taskyard commands run in this directory use it).")
        if generated:
            click.echo(
                f"Generated {' and '.join(generated)} (shown once; also in the stack "
                "file). For a shell elsewhere:"
            )
        else:
            click.echo("For a shell elsewhere:")
        click.echo("\n".join("  " + line for line in stack.export_lines(configured_secrets)))
        click.echo("\nPress Ctrl-C to stop everything.", err=True)
        code = run_until_signalled(supervisor, on_tick=followed)
    finally:
        click.echo("taskyard up: stopping...", err=True)
        supervisor.stop()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        stackfile.remove_if_owned(path, os.getpid())
        click.echo("taskyard up: stopped.", err=True)
    sys.exit(code)
