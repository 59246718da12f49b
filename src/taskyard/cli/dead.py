"""``taskyard dead``: the dead letters of tasks and batches: list, show, replay, purge."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, app_path_of, load_app
from taskyard.cli.output import echo
from taskyard.errors import TaskyardError
from taskyard.runtime import runtime_of

_REASONS = click.Choice(["failed", "crashed", "poison", "expired"])


@contextmanager
def _reported() -> Iterator[None]:
    """A taskyard error inside becomes the command's one-line error (a user error)."""
    try:
        yield
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


class Since(click.ParamType[float]):
    """``--since``: a number of seconds back from now, or an ISO 8601 time (local time when it
    has no zone, as ``dead list`` prints); converted to seconds since the epoch."""

    name = "since"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            back = float(text)
        except ValueError:
            from taskyard.monitoring.api.query import epoch_seconds

            try:
                return epoch_seconds(text, naive_utc=False)
            except ValueError as exc:
                self.fail(f"{exc}; give SECONDS back from now or an ISO 8601 TIME", param, ctx)
        if not math.isfinite(back) or back < 0:
            self.fail(f"{value!r} is not a number of seconds back (0 or more)", param, ctx)
        return time.time() - back


def _filters(f: Any) -> Any:
    for option in reversed(
        (
            click.option("--name", help="Task name (exact)."),
            click.option("--queue", help="Queue the task died on."),
            click.option("--reason", type=_REASONS, help="Why it is dead."),
            click.option("--exception", "exception_type", help="Exception type, e.g. ValueError."),
            click.option(
                "--since",
                type=Since(),
                metavar="SECONDS|TIME",
                help="Only entries that died within the last SECONDS, or at or after TIME "
                "(ISO 8601, e.g. 2026-01-01T08:00; local time unless it has a zone).",
            ),
        )
    ):
        f = option(f)
    return f


def _query(
    name: str | None,
    queue: str | None,
    reason: str | None,
    exception_type: str | None,
    since: float | None,
    state: str | None = "dead",
) -> Any:
    """The store's query of the filter options (``since`` already in seconds since the epoch)."""
    from taskyard.deadletters import Query

    return Query(
        name=name,
        queue=queue,
        reason=reason,
        exception_type=exception_type,
        state=state,
        since=since,
    )


def _store(app: Any) -> Any:
    from taskyard.deadletters import RedisDeadLetterStore
    from taskyard.runtime import runtime_of

    return RedisDeadLetterStore.for_runtime(runtime_of(app))


@click.group("dead")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def dead(ctx: click.Context, app_path: str | None, as_json: bool) -> None:
    """Dead letters: tasks that failed for good, crashed, expired, poison messages; batches."""
    ctx.obj = {"app_path": app_path, "json": as_json}


@dead.command("list")
@APP_FLAG
@_filters
@click.option(
    "--state", type=click.Choice(["dead", "replayed", "all"]), default="dead", show_default=True
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option(
    "--batches/--no-batches",
    default=True,
    show_default=True,
    help="Also list dead batches (batching's own dead letters).",
)
@click.pass_context
def list_command(
    ctx: click.Context,
    name: str | None,
    queue: str | None,
    reason: str | None,
    exception_type: str | None,
    since: float | None,
    state: str,
    limit: int,
    batches: bool,
) -> None:
    """List dead letters, newest first."""
    from taskyard.deadletters.batches import batch_dead_letters

    app = load_app(app_path_of(ctx))
    with _reported():
        query = _query(
            name, queue, reason, exception_type, since, None if state == "all" else state
        )
        store = _store(app)
        pattern = runtime_of(app).settings.redact_pattern
        # Shown redacted (redact= names, TASKYARD_REDACT_PATTERN); replays send the values.
        entries = [e.redacted(pattern) for e in store.search(query, limit=limit)]
        total = store.count(query)
    dead_batches = (
        batch_dead_letters(app)
        if batches and name is None and queue is None and exception_type is None
        else []
    )
    if ctx.obj["json"]:
        echo(
            json.dumps(
                {
                    "total": total,
                    "entries": [e.to_dict() for e in entries],
                    "batches": dead_batches,
                },
                indent=2,
            )
        )
        return
    if not entries:
        echo("no dead tasks")
    else:
        echo(f"{total} dead tasks" + (f" (newest {len(entries)})" if total > len(entries) else ""))
    for e in entries:
        # "ValueError: declined", or a poison message's detail alone ("unknown task 'x'").
        what = f"{e.exception_type}: {e.exception[:80]}" if e.exception_type else e.detail[:80]
        echo(
            f"{e.id}  {_when(e.last_at)}  {e.reason:<7}  {e.name or '-'}  "
            f"queue={e.queue or '-'}  deliveries={e.deliveries}  attempts={e.attempts}  "
            f"{what}" + (f"  (replayed as {e.replayed_as})" if e.state == "replayed" else ""),
            lines=False,
        )
    if dead_batches:
        echo(f"{len(dead_batches)} dead batches")
        for b in dead_batches:
            echo(
                f"{b['id']}  {_when(b['last_at'])}  {b['reason']:<7}  items={b['size']}  "
                f"attempts={b['attempts']}  {b['error'][:80]}",
                lines=False,
            )


@dead.command("show")
@APP_FLAG
@click.argument("entry_id")
@click.pass_context
def show(ctx: click.Context, entry_id: str) -> None:
    """Show one dead letter in full (a task id, or NAME/ID of a dead batch)."""
    app = load_app(app_path_of(ctx))
    if "/" in entry_id:
        from taskyard.deadletters.batches import batch_dead_letters

        name = entry_id.partition("/")[0]
        found = [b for b in batch_dead_letters(app, name, items=1000) if b["id"] == entry_id]
        if not found:
            raise click.ClickException(f"no dead batch {entry_id!r}")
        echo(json.dumps(found[0], indent=2))
        return
    entry = _store(app).get(entry_id)
    if entry is None:
        raise click.ClickException(f"no dead letter {entry_id!r}")
    entry = entry.redacted(runtime_of(app).settings.redact_pattern)
    if ctx.obj["json"]:
        echo(json.dumps(entry.to_dict(), indent=2))
        return
    for key, value in entry.to_dict().items():
        if key == "traceback" and value:
            echo("traceback:\n" + str(value).rstrip())
        elif value not in ("", {}, 0.0) or key in ("deliveries", "attempts"):
            shown = _when(value) if key.endswith("_at") else value
            echo(f"{key}: {shown}", lines=False)


def _selection(
    entry_ids: tuple[str, ...], every: bool, filters: dict[str, Any], state: str | None = "dead"
) -> Any:
    """What a replay or purge takes: None for the ``entry_ids`` given, else the query of the
    filter options (or of ``--all``, every entry in ``state``).

    Raises:
        click.UsageError: not exactly one of entry ids, filter options and ``--all`` is given.
        TaskyardError: a filter value the store refuses.
    """
    given = bool(entry_ids) + every + any(v is not None for v in filters.values())
    if given != 1:
        raise click.UsageError("give entry ids, filter options, or --all (one of them)")
    return None if entry_ids else _query(**filters, state=state)


def _selection_options(every_help: str, batch_help: str) -> Callable[[Any], Any]:
    """The options of replay and purge: entry ids, the filters, ``--all``, ``--batch``."""

    def decorate(f: Any) -> Any:
        f = click.option("--batch", "batch_ref", metavar="NAME[/ID]", help=batch_help)(f)
        f = click.option("--all", "every", is_flag=True, help=every_help)(f)
        return click.argument("entry_ids", nargs=-1)(_filters(f))

    return decorate


@dead.command("replay")
@APP_FLAG
@_selection_options(
    "Every dead task.", "Requeue dead batches of NAME (or one, NAME/ID) instead of tasks."
)
@click.pass_context
def replay(
    ctx: click.Context,
    /,
    entry_ids: tuple[str, ...],
    every: bool,
    batch_ref: str | None,
    **filters: Any,
) -> None:
    """Send dead tasks again, to their own level; each links back to its dead entry."""
    from taskyard.deadletters.replay import replay as replay_many
    from taskyard.deadletters.replay import replay_one

    app = load_app(app_path_of(ctx))
    if batch_ref is not None:
        from taskyard.deadletters.batches import replay_batches

        with _reported():
            refs = replay_batches(app, batch_ref)
        echo(f"requeued {len(refs)} dead batches: {' '.join(refs) or '-'}")
        return
    with _reported():
        query = _selection(entry_ids, every, filters)
        store = _store(app)
        if query is None:
            for entry_id in entry_ids:
                echo(f"{entry_id} -> {replay_one(app, store, entry_id)}")
            return
        total = store.count(query)
        with click.progressbar(length=total, label="replaying", file=sys.stderr) as bar:
            report = replay_many(
                app, store, query, progress=lambda done, _total, _id: bar.update(1)
            )
    echo(f"replayed {len(report.replayed)} of {total} dead tasks")
    for entry_id, why in report.skipped.items():
        echo(f"skipped {entry_id}: {why}")


@dead.command("purge")
@APP_FLAG
@_selection_options(
    "Every dead letter, replayed ones too.",
    "Delete dead batches of NAME (or one, NAME/ID) instead of tasks.",
)
@click.pass_context
def purge(
    ctx: click.Context,
    /,
    entry_ids: tuple[str, ...],
    every: bool,
    batch_ref: str | None,
    **filters: Any,
) -> None:
    """Delete dead letters for good."""
    app = load_app(app_path_of(ctx))
    if batch_ref is not None:
        from taskyard.deadletters.batches import purge_batches

        with _reported():
            items = purge_batches(app, batch_ref)
        echo(f"purged {items} items of dead batches")
        return
    with _reported():
        query = _selection(entry_ids, every, filters, None if every else "dead")
        store = _store(app)
        deleted = store.delete(list(entry_ids)) if query is None else store.purge(query)
    echo(f"purged {deleted} dead letters")
