"""``taskyard task ID``: one task's timeline from the history database, and its dead letter."""

from __future__ import annotations

import json
import time

import click

from taskyard.cli.loader import APP_OPTION, load_runtime
from taskyard.cli.output import echo, when


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
    found = timeline.with_job_state(runtime, task_id, found)
    dead = RedisDeadLetterStore.for_runtime(runtime).get(task_id)
    if dead is not None:
        # Shown redacted (redact= names, TASKYARD_REDACT_PATTERN); the store keeps the values.
        dead = dead.redacted(runtime.settings.redact_pattern)
    if found is None and dead is None:
        raise click.ClickException(
            f"no task {task_id!r} in the timelines or the dead letters "
            "(timelines are kept TASKYARD_DEAD_LETTERS__TIMELINE_"
            "RETENTION_S)"
        )
    if as_json:
        echo(json.dumps({"timeline": found, "dead": dead.to_dict() if dead else None}, indent=2))
        return
    if found is not None and found.get("events"):
        counts = ", ".join(f"{k} {v}" for k, v in found["counts"].items() if v)
        echo(
            f"{task_id}  {found['name']}  queue={found['queue'] or '-'}  "
            f"state={found['state']}  ({counts})",
            lines=False,
        )
        for event in found["events"]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event["at"]))
            millis = f"{event['at'] % 1:.3f}"[1:] + " UTC"
            echo(
                f"  {stamp}{millis}  {event['event']:<9}  {event['worker'] or '-'}  "
                f"{_detail(event['event'], event['detail'])}".rstrip(),
                lines=False,
            )
    cancel = (found or {}).get("cancel")
    if cancel:
        outcome = cancel.get("outcome") or "requested (not yet seen by a worker)"
        echo(
            f"cancelled: {when(cancel.get('at'))} by {cancel.get('by')}"
            f"{' with --terminate' if cancel.get('terminate') else ''}: {outcome}"
        )
    progress = (found or {}).get("progress")
    if progress:
        total = progress.get("total")
        detail = str(progress.get("detail") or "")
        echo(
            f"progress: {progress.get('done')}{f'/{total}' if total is not None else ''}"
            f"{f'  {detail}' if detail else ''}  ({when(progress.get('at'))})"
        )
    if dead is not None:
        echo(
            f"dead letter: {dead.reason}, {dead.exception_type or dead.detail}: "
            f"{(dead.exception or dead.detail)[:200]}"
            + (f" (replayed as {dead.replayed_as})" if dead.replayed_as else ""),
            lines=False,
        )


def _detail(event: str, detail: str) -> str:
    """An event's detail; a finished run's bare run time (seconds) with its unit."""
    if event in ("succeeded", "failed", "retried"):
        try:
            seconds = float(detail)
        except ValueError:
            return detail
        return f"ran {seconds * 1000:.1f} ms" if seconds < 1 else f"ran {seconds:.3f} s"
    return detail
