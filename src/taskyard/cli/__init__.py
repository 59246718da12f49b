"""The ``taskyard`` command: one module per command group, one app loader (:mod:`.loader`)."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from taskyard.cli.api import api_command
from taskyard.cli.batches import batches
from taskyard.cli.cache import cache
from taskyard.cli.cancel import cancel
from taskyard.cli.dead import dead
from taskyard.cli.flow import limits, pause, paused, resume
from taskyard.cli.flower import flower
from taskyard.cli.loader import APP_FLAG, use_stack_file
from taskyard.cli.maintenance import maintenance
from taskyard.cli.output import echo
from taskyard.cli.shell import env_command, shell_command
from taskyard.cli.stack import up, worker
from taskyard.cli.stats import stats
from taskyard.cli.task import task_command
from taskyard.cli.users import users
from taskyard.errors import TaskyardError

#: Exit status of every error that is the user's to fix (bad option, bad -A, unreachable Redis).
USER_ERROR = 2


class TaskyardGroup(click.Group):
    """The command group: every user error is one line on stderr and exit status 2."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        import redis

        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{hint}")
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("taskyard: aborted", err=True)
            sys.exit(1)
        except TaskyardError as exc:
            _fail(str(exc))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            _fail(f"cannot reach Redis: {exc}")
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> NoReturn:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    echo(f"taskyard: error: {first}", err=True, lines=False)
    sys.exit(USER_ERROR)


@click.group(cls=TaskyardGroup)
@click.version_option(package_name="taskyard")
@APP_FLAG
@click.pass_context
def main(ctx: click.Context) -> None:
    """taskyard: Celery task orchestration with five priority levels.

    Settings come from TASKYARD_* variables, then from the .taskyard-stack.json that
    `taskyard up` writes in its directory, then the defaults.
    """
    # `taskyard up` writes the stack file; it never reads another stack's.
    if ctx.invoked_subcommand != "up" and not ctx.resilient_parsing:
        use_stack_file()


for command in (
    worker,
    up,
    flower,
    api_command,
    batches,
    dead,
    task_command,
    cancel,
    cache,
    maintenance,
    stats,
    users,
    shell_command,
    env_command,
    limits,
    pause,
    resume,
    paused,
):
    main.add_command(command)
