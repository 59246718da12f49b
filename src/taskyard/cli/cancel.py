"""``taskyard cancel``: durable cancellation by id or by filter."""

from __future__ import annotations

import json

import click

from taskyard.cli.loader import APP_OPTION, load_app
from taskyard.cli.output import echo


@click.command("cancel")
@click.argument("task_ids", nargs=-1)
@click.option("--name", "name", default=None, help="Cancel every task whose name matches GLOB.")
@click.option("--queue", default=None, help="With --name: only tasks on this queue.")
@click.option(
    "--older-than",
    "older_than",
    type=float,
    default=None,
    help="With --name: only tasks sent more than S seconds ago.",
)
@click.option(
    "--terminate",
    is_flag=True,
    help="Kill a task still running after the grace period (prefork pool).",
)
@click.option("--grace", type=float, default=None, help="Grace period of --terminate (s).")
@click.option("--yes", is_flag=True, help="Do not ask before cancelling by filter.")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def cancel(
    task_ids: tuple[str, ...],
    name: str | None,
    queue: str | None,
    older_than: float | None,
    terminate: bool,
    grace: float | None,
    yes: bool,
    app_path: str | None,
    as_json: bool,
) -> None:
    """Cancel tasks: TASK_ID... or --name GLOB [--queue Q] [--older-than S].

    A cancelled task never starts (queued, delayed, reserved, or sent while every worker was
    down); a running one sees cancel_requested() and --terminate ends it after a grace period.
    """
    from taskyard.broker.control.service import control_of
    from taskyard.runtime import runtime_of

    if not task_ids and name is None:
        raise click.UsageError("give task ids, or --name GLOB")
    if (queue is not None or older_than is not None) and name is None:
        raise click.UsageError("--queue and --older-than filter --name")
    app = load_app(app_path)
    control = control_of(app, runtime_of(app))
    ids = list(task_ids)
    if name is not None:
        found = control.find(name, queue, older_than)
        if not as_json:
            where: dict[str, int] = {}
            for f in found:
                where[f.where] = where.get(f.where, 0) + 1
            parts = ", ".join(f"{n} {w}" for w, n in sorted(where.items())) or "none"
            echo(f"{len(found)} task(s) match {name!r} ({parts})", lines=False)
        if found and not yes and not as_json:
            click.confirm(f"cancel {len(found)} task(s)?", abort=True)
        ids += [f.task_id for f in found]
    cancelled = control.cancel(ids, by="cli", terminate=terminate, grace_s=grace) if ids else 0
    if as_json:
        click.echo(json.dumps({"selected": len(dict.fromkeys(ids)), "cancelled": cancelled}))
        return
    click.echo(f"cancelled {cancelled} task(s) ({len(dict.fromkeys(ids)) - cancelled} already)")
