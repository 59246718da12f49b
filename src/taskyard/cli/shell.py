"""``taskyard shell`` and ``taskyard env``: the running stack's settings in a shell of your own.

A plain ``python`` in the directory of ``taskyard up`` would send to the default Redis, not the
stack's embedded one: only the ``taskyard`` command reads the stack file. ``taskyard shell``
opens Python with the stack's settings applied and the app loaded; ``eval "$(taskyard env)"``
exports them into a POSIX shell, for ``python``, ``celery`` or a test runner started from it.
"""

from __future__ import annotations

import code
import os
import shlex

import click

from taskyard.cli import loader
from taskyard.cli.loader import APP_OPTION, load_app
from taskyard.config import ENV_PREFIX


def stack_variables() -> dict[str, str]:
    """The TASKYARD_* variables this command runs with (environment, then stack file)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIX)}


@click.command("env")
def env_command() -> None:
    """Print `export TASKYARD_...` lines for the stack here: eval "$(taskyard env)"."""
    variables = stack_variables()
    resolution = loader.resolution()
    if resolution is not None and resolution.ignored:
        click.echo(f"# {resolution.ignored}", err=True)
    if not variables:
        click.echo("# no TASKYARD_* settings here: no environment and no running stack", err=True)
    for name, value in variables.items():
        click.echo(f"export {name}={shlex.quote(value)}")


@click.command("shell")
@APP_OPTION
def shell_command(app_path: str | None) -> None:
    """Python with the stack's settings and the app loaded (`app`, and its tasks by name)."""
    app = load_app(app_path, import_tasks=True)
    app.set_current()
    names = {"app": app}
    for name, task in app.tasks.items():
        short = name.rsplit(".", 1)[-1]
        if not name.startswith("celery.") and short.isidentifier():
            names.setdefault(short, task)
    settings = stack_variables()
    redis_url = settings.get(f"{ENV_PREFIX}REDIS_URL", "the default Redis")
    banner = (
        f"taskyard shell: app {app.main!r} on {redis_url}\n"
        f"names: app, {', '.join(sorted(n for n in names if n != 'app'))[:400]}"
    )
    code.interact(banner=banner, local=names, exitmsg="")
