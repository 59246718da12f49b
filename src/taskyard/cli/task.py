"""``taskyard task ID``: one task's timeline from the history database, and its dead letter."""

from __future__ import annotations

import json
import time

import click

from taskyard.cli.loader import APP_OPTION, load_runtime
from taskyard.cli.output import echo


@click.command("task")
@click.argument("task_id")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def task_command(task_id: str, app_path: str | None, as_json: bool) -> None:
    """Show what happened to task TASK_ID: sent, received, started, ... succeeded or dead."""
    from taskyard.deadletters import RedisDeadLetterStore
    from taskyard.monitoring import history, timeline

    runtime = load_runtime(app_path)
    engine = history.engine_for(runtime.settings.effective_history_url)
    found = timeline.lookup(runtime, engine, task_id)
    dead = RedisDeadLetterStore.for_runtime(runtime).get(task_id)
    if found is None and dead is None:
        raise click.ClickException(
            f"no task {task_id!r} in the timelines or the dead letters "
            "(timelines are kept TASKYARD_DEAD_LETTERS__TIMELINE_"
            "RETENTION_S)"
        )
    if as_json:
        echo(json.dumps({"timeline": found, "dead": dead.to_dict() if dead else None}, indent=2))
        return
    if found is not None:
        counts = ", ".join(f"{k} {v}" for k, v in found["counts"].items() if v)
        echo(
            f"{task_id}  {found['name']}  queue={found['queue'] or '-'}  "
            f"state={found['state']}  ({counts})",
            lines=False,
        )
        for event in found["events"]:
            stamp = time.strftime("%H:%M:%S", time.localtime(event["at"]))
            millis = f"{event['at'] % 1:.3f}"[1:]
            echo(
                f"  {stamp}{millis}  {event['event']:<9}  {event['worker'] or '-'}  "
                f"{event['detail']}".rstrip(),
                lines=False,
            )
    if dead is not None:
        echo(
            f"dead letter: {dead.reason}, {dead.exception_type or dead.detail}: "
            f"{(dead.exception or dead.detail)[:200]}"
            + (f" (replayed as {dead.replayed_as})" if dead.replayed_as else ""),
            lines=False,
        )
