"""``taskyard limits``, ``pause``, ``resume``, ``paused``: flow control at run time.

Changes are stored in the broker's Redis; running workers (plain ``celery worker`` of a taskyard
app too) apply them on their next fetch, within about a second.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, load_app
from taskyard.cli.output import echo, records


def _store(app_path: str | None, import_tasks: bool = False) -> Any:
    from taskyard.flow import store_of

    return store_of(load_app(app_path, import_tasks=import_tasks, serving=True))


def _since(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


@click.group("limits")
@APP_FLAG
def limits() -> None:
    """Cluster-wide rate and concurrency limits of tasks (show, set, clear, reset)."""


@limits.command("show")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def limits_show(app_path: str | None, as_json: bool) -> None:
    """Each limit: configured, running now, started in the last minute, waiting."""
    store = _store(app_path)
    status = store.status()
    if as_json:
        echo(json.dumps({"limits": status, "held": store.held()}, indent=2))
        return
    records("limits", status)
    records("held messages", store.held())


@limits.command("set")
@click.argument("task_name")
@click.option("--rate", default=None, help='Cluster-wide rate: "10/s", "600/m", "5/h"; none: off.')
@click.option("--concurrency", type=int, default=None, help="At most this many at once; 0: off.")
@click.option(
    "--weight",
    "weights",
    multiple=True,
    metavar="VALUE=W",
    help="Fair-share weight of one partition value (repeatable).",
)
@APP_OPTION
def limits_set(
    task_name: str,
    rate: str | None,
    concurrency: int | None,
    weights: tuple[str, ...],
    app_path: str | None,
) -> None:
    """Change TASK_NAME's limits now (over what its decorator declares)."""
    if rate is None and concurrency is None and not weights:
        raise click.UsageError("give --rate, --concurrency or --weight")
    store = _store(app_path)
    parsed = []
    for item in weights:
        value, sep, number = item.rpartition("=")
        if not sep or not number.isdigit():
            raise click.UsageError(f"--weight {item!r}: expected VALUE=W with W an integer >= 1")
        parsed.append((value, int(number)))
    if rate is not None or concurrency is not None:
        result = store.set_limits(task_name, rate=rate, concurrency=concurrency)
        echo(
            f"{task_name}: rate {result.rate or 'none'}, concurrency "
            f"{result.concurrency or 'none'} ({result.source})"
        )
    for value, weight in parsed:
        store.set_weight(task_name, value, weight)
        echo(f"{task_name}: partition {value!r} weight {weight}")


@limits.command("clear")
@click.argument("task_name")
@APP_OPTION
def limits_clear(task_name: str, app_path: str | None) -> None:
    """Run TASK_NAME without rate or concurrency limit (until `limits set` or `reset`)."""
    _store(app_path).clear_limits(task_name)
    echo(f"{task_name}: no limits")


@limits.command("reset")
@click.argument("task_name")
@APP_OPTION
def limits_reset(task_name: str, app_path: str | None) -> None:
    """Drop TASK_NAME's run-time changes: back to what its decorator declares."""
    result = _store(app_path).reset_limits(task_name)
    echo(
        f"{task_name}: rate {result.rate or 'none'}, concurrency "
        f"{result.concurrency or 'none'} ({result.source})"
    )


def _target(queue: str | None, task: str | None) -> dict[str, str | None]:
    if (queue is None) == (task is None):
        raise click.UsageError("give a QUEUE or --task NAME_OR_GLOB")
    return {"queue": queue, "task": task}


@click.command("pause")
@click.argument("queue", required=False)
@click.option("--task", default=None, metavar="NAME_OR_GLOB", help="Pause tasks, not a queue.")
@click.option("--key", default="default", show_default=True, help="Who pauses (e.g. deploy).")
@APP_OPTION
def pause(queue: str | None, task: str | None, key: str, app_path: str | None) -> None:
    """Stop starting QUEUE's (or matching tasks') work, durably, until every key resumes."""
    target = _target(queue, task)
    _store(app_path).pause(**target, key=key)
    echo(f"paused {queue or task} (key {key})")


@click.command("resume")
@click.argument("queue", required=False)
@click.option("--task", default=None, metavar="NAME_OR_GLOB", help="Resume tasks, not a queue.")
@click.option("--key", default="default", show_default=True, help="The key that paused it.")
@click.option("--all-keys", is_flag=True, help="Withdraw every key's pause.")
@APP_OPTION
def resume(
    queue: str | None, task: str | None, key: str, all_keys: bool, app_path: str | None
) -> None:
    """Withdraw KEY's pause; the work starts again once no key pauses it."""
    target = _target(queue, task)
    left = _store(app_path).resume(**target, key=key, all_keys=all_keys)
    name = queue or task
    if left:
        echo(f"{name}: still paused by {', '.join(left)}")
    else:
        echo(f"resumed {name}")


@click.command("paused")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def paused(app_path: str | None, as_json: bool) -> None:
    """What is paused, by which keys, since when; and the messages held."""
    store = _store(app_path)
    pauses = store.pauses()
    held = store.held()
    if as_json:
        echo(json.dumps({"paused": pauses, "held": held}, indent=2))
        return
    records(
        "paused",
        [
            {
                "kind": p["kind"],
                "name": p["name"],
                "keys": ", ".join(
                    f"{k} (since {_since(at)})" for k, at in sorted(p["keys"].items())
                ),
            }
            for p in pauses
        ],
    )
    records("held messages", held)
