"""The one app loader of the ``taskyard`` command: ``-A APP`` as ``celery -A`` reads it.

Every command group takes its app, runtime or settings from here, so an app is found the same
way everywhere and a user's mistake (a misspelt ``-A``, a malformed setting) is one line.

Settings come from the environment, then the stack file of a running ``taskyard up`` in the
working directory (:mod:`.stackfile`), then the defaults. A command that falls back from the
environment for its Redis says in one line which Redis it reads, and a command that reads
taskyard's data warns when that Redis holds none.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from taskyard.config import ENV_PREFIX, NESTED_DELIMITER, Settings, load_settings
from taskyard.devstack import stackfile
from taskyard.errors import TaskyardError
from taskyard.runtime import Runtime, runtime_of

#: The Redis setting's variable.
REDIS_VARIABLE = f"{ENV_PREFIX}REDIS_URL"

#: What this process's stack file contributed (set once, by :func:`use_stack_file`).
_resolution: stackfile.Resolution | None = None
_announced = False


def configured(settings: Settings, variable: str) -> bool:
    """Whether the environment (as the settings module read it) sets ``variable``."""
    parts = variable[len(ENV_PREFIX) :].lower().split(NESTED_DELIMITER.lower())
    model: Any = settings
    for part in parts[:-1]:
        if part not in model.model_fields_set:
            return False
        model = getattr(model, part, None)
        if model is None:
            return False
    return parts[-1] in model.model_fields_set


def use_stack_file() -> stackfile.Resolution:
    """Fill the settings the environment leaves unset from the stack file here; called once per
    command (the group's callback), which also re-arms the one-line Redis notice."""
    global _resolution, _announced
    from_env = settings()
    _resolution = stackfile.apply(os.environ, lambda name: configured(from_env, name))
    _announced = False
    return _resolution


def resolution() -> stackfile.Resolution | None:
    """What the stack file contributed to this command (None before the group ran)."""
    return _resolution


def announce_redis(settings: Settings, *, check_data: bool) -> None:
    """Say which Redis this command reads when the environment did not choose it (once), and,
    with ``check_data``, warn when it holds no taskyard data.

    Raises:
        click.ClickException: ``check_data`` and the Redis does not answer.
    """
    global _announced
    if _announced:
        return
    _announced = True
    url = settings.effective_redis_url
    resolution = _resolution or stackfile.Resolution(path=stackfile.stack_path())
    line = None
    if settings.redis_url is None or REDIS_VARIABLE in resolution.applied:
        line = stackfile.redis_line(url, resolution, REDIS_VARIABLE)
    if line:
        click.echo(line, err=True)
    if not check_data:
        return
    import redis

    from taskyard.keys import Keys

    keys = Keys(settings.namespace)
    client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=5.0)
    try:
        found = client.exists(
            keys.workers(),
            keys.task_counts(),
            keys.series("overview"),
            keys.alerts(),
            keys.batch_registry(),
            keys.dead_entries(),
        )
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"cannot reach Redis at {url}: {exc}") from None
    finally:
        client.close()
    if not found:
        click.echo(stackfile.no_data_line(url, settings.namespace, REDIS_VARIABLE), err=True)


#: Where the ``-A`` given anywhere on the command line is kept (click's meta is shared by every
#: context of one invocation).
_APP_META = "taskyard.app"


def _remember_app(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``-A`` may come before the group, after it, or after the subcommand: the last one given
    wins, and a command that got none takes the one given before it."""
    if value is not None:
        ctx.meta[_APP_META] = value
        return value
    found = ctx.meta.get(_APP_META)
    return found if isinstance(found, str) else None


def app_path_of(ctx: click.Context) -> str | None:
    """The ``-A`` given anywhere on this command line (None: none)."""
    found = ctx.meta.get(_APP_META)
    return found if isinstance(found, str) else None


_APP_HELP = (
    "taskyard Celery app, as for `celery -A` (default: an app built from the TASKYARD_* "
    "settings). Accepted before or after the command's name."
)


def _app_option(**extra: Any) -> Callable[[Any], Any]:
    return click.option(
        "-A",
        "--app",
        "app_path",
        default=None,
        metavar="APP",
        callback=_remember_app,
        help=_APP_HELP,
        **extra,
    )


#: The ``-A`` option of commands for which an app is optional (settings alone are enough).
APP_OPTION = _app_option()
#: The same option on a group or a command that reads it with :func:`app_path_of`.
APP_FLAG = _app_option(expose_value=False, is_eager=True)


def settings() -> Settings:
    """Settings from the environment; a malformed one is a one-line error."""
    try:
        return load_settings()
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None


def load_app(
    app_path: str | None,
    *,
    default_name: str = "taskyard",
    import_tasks: bool = False,
    serving: bool = False,
) -> Any:
    """The app named by ``app_path``, or one built from settings when it is None.

    ``import_tasks`` imports the app's task modules as a worker would (warmers and batch
    definitions register there). Unless ``serving`` (a server process, whose Redis may rightly
    be empty yet), the Redis it reads is checked for taskyard data.
    """
    app = _find_app(app_path, default_name, import_tasks)
    try:
        app_settings = runtime_of(app).settings
    except TaskyardError:
        app_settings = settings()
    announce_redis(app_settings, check_data=not serving)
    return app


def _find_app(app_path: str | None, default_name: str, import_tasks: bool) -> Any:
    try:
        if app_path is None:
            from taskyard.app import create_app

            return create_app(default_name)
        from celery.app.utils import find_app

        # As `celery -A` does: apps are found relative to the working directory.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        app = find_app(app_path)
        if import_tasks:
            app.loader.import_default_modules()
        return app
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    except (ImportError, AttributeError) as exc:
        raise click.ClickException(f"cannot load app {app_path!r}: {exc}") from None
    except Exception as exc:
        # celery's find_app wraps a missing module or attribute in its own errors.
        raise click.ClickException(
            f"cannot load app {app_path!r}: {type(exc).__name__}: {exc}"
        ) from None


def load_runtime(
    app_path: str | None, *, default_name: str = "taskyard", import_tasks: bool = False
) -> Runtime:
    """The runtime of :func:`load_app`'s app."""
    app = load_app(app_path, default_name=default_name, import_tasks=import_tasks)
    try:
        return runtime_of(app)
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
