"""``taskyard batches``: batch buffers per name and key, dead letters, requeue and purge."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, app_path_of, load_app
from taskyard.cli.output import echo, safe
from taskyard.errors import TaskyardError


def _age(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def render(states: list[dict[str, Any]]) -> str:
    """The ``taskyard batches`` table: one row per batch name and one per key of it."""
    if not states:
        return "no batches yet (nothing was ever buffered)"
    header = (
        "batch",
        "key",
        "buffered",
        "oldest",
        "in flight",
        "dead",
        "processed",
        "failed",
        "flushes size/age/manual",
        "duplicates",
    )
    rows: list[tuple[str, ...]] = [header]
    for state in states:
        groups = state["groups"]
        lines = [state] if len(groups) <= 1 else [state, *groups]
        for entry in lines:
            name = state["batch_name"] if entry is state else ""
            key = "(all)" if entry is state and len(groups) > 1 else entry.get("group", "")
            if entry is state and len(groups) == 1:
                key = groups[0]["group"]
            reasons = entry["flush_reasons"]
            rows.append(
                (
                    safe(name, lines=False),
                    safe(key or "-", lines=False),
                    str(entry["buffered"]),
                    _age(entry["oldest_age_s"]),
                    f"{entry['in_flight']} ({entry['in_flight_items']} items)",
                    f"{entry['dead']} ({entry['dead_items']} items)",
                    str(entry["processed"]),
                    str(entry["failed"]),
                    f"{reasons.get('size', 0)}/{reasons.get('age', 0)}/{reasons.get('manual', 0)}",
                    str(entry["duplicates"]),
                )
            )
    return _table(rows)


@click.group("batches", invoke_without_command=True)
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def batches(ctx: click.Context, app_path: str | None, as_json: bool) -> None:
    """Batch buffers: items waiting, oldest age, in flight, dead, counters, per name and key."""
    ctx.obj = {"app_path": app_path, "json": as_json}
    if ctx.invoked_subcommand is not None:
        return
    from taskyard.batching.inspect import inspect_batches

    try:
        states = inspect_batches(load_app(app_path))
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    echo(json.dumps(states, indent=2) if as_json else render(states))


@batches.command("dead")
@APP_FLAG
@click.argument("batch_name", required=False)
@click.option("--items", default=3, show_default=True, help="Items shown per dead batch.")
@click.pass_context
def dead(ctx: click.Context, batch_name: str | None, items: int) -> None:
    """List dead batches (of BATCH_NAME, or all) with their last error."""
    from taskyard.batching.inspect import list_dead

    found = list_dead(load_app(app_path_of(ctx)), batch_name, items=items)
    if ctx.obj["json"]:
        echo(json.dumps(found, indent=2))
        return
    if not found:
        echo("no dead batches")
        return
    for entry in found:
        echo(
            f"{entry['batch_name']}/{entry['batch_id']} key={entry['group'] or '-'} "
            f"items={entry['size']} attempts={entry['attempts']}: {entry['error']}",
            lines=False,
        )
        for item in entry["items"]:
            echo(f"    {item}", lines=False)


def _ids(batch_ids: tuple[str, ...], every: bool) -> list[str] | None:
    if bool(batch_ids) == every:
        raise click.UsageError("give batch ids, or --all (not both)")
    return None if every else list(batch_ids)


@batches.command("requeue")
@APP_FLAG
@click.argument("batch_name")
@click.argument("batch_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead batch of BATCH_NAME.")
@click.pass_context
def requeue(ctx: click.Context, batch_name: str, batch_ids: tuple[str, ...], every: bool) -> None:
    """Put dead batches back into work with fresh retries."""
    from taskyard.batching.inspect import requeue_dead

    try:
        done = requeue_dead(load_app(app_path_of(ctx)), batch_name, _ids(batch_ids, every))
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    echo(f"requeued {len(done)} batches of {batch_name}: {' '.join(done) or '-'}")


@batches.command("purge")
@APP_FLAG
@click.argument("batch_name")
@click.argument("batch_ids", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every dead batch of BATCH_NAME.")
@click.pass_context
def purge(ctx: click.Context, batch_name: str, batch_ids: tuple[str, ...], every: bool) -> None:
    """Delete dead batches for good."""
    from taskyard.batching.inspect import purge_dead

    deleted = purge_dead(load_app(app_path_of(ctx)), batch_name, _ids(batch_ids, every))
    echo(f"purged {deleted} items of dead batches of {batch_name}")
