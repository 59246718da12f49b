"""The one app loader of the ``taskyard`` command: ``-A APP`` as ``celery -A`` reads it.

Every command group takes its app, runtime or settings from here, so an app is found the same
way everywhere and a user's mistake (a misspelt ``-A``, a malformed setting) is one line.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from taskyard.config import Settings, load_settings
from taskyard.errors import TaskyardError
from taskyard.runtime import Runtime, runtime_of

#: The ``-A`` option of commands for which an app is optional (settings alone are enough).
APP_OPTION = click.option(
    "-A", "--app", "app_path", default=None, metavar="APP",
    help="taskyard Celery app, as for `celery -A` (default: an app built from the "
         "TASKYARD_* settings).")


def settings() -> Settings:
    """Settings from the environment; a malformed one is a one-line error."""
    try:
        return load_settings()
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None


def load_app(app_path: str | None, *, default_name: str = "taskyard",
             import_tasks: bool = False) -> Any:
    """The app named by ``app_path``, or one built from settings when it is None.

    ``import_tasks`` imports the app's task modules as a worker would (warmers and batch
    definitions register there).
    """
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


def load_runtime(app_path: str | None, *, default_name: str = "taskyard",
                 import_tasks: bool = False) -> Runtime:
    """The runtime of :func:`load_app`'s app."""
    app = load_app(app_path, default_name=default_name, import_tasks=import_tasks)
    try:
        return runtime_of(app)
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
