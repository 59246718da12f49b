"""``taskyard cache warm|clear|stats``: the Redis cache and its warmers."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, load_runtime
from taskyard.cli.output import echo
from taskyard.errors import TaskyardError


@click.group()
@APP_FLAG
def cache() -> None:
    """The Redis cache: warm it, clear a tag, show statistics."""


@cache.command("warm")
@click.option("--name", "names", multiple=True, help="Run only this warmer (repeatable).")
@APP_OPTION
def cache_warm(names: tuple[str, ...], app_path: str | None) -> None:
    """Run the registered cache warmers now and report keys warmed and time taken."""
    from taskyard.cache.warming import registered_warmers, run_warmers

    runtime = load_runtime(app_path, import_tasks=True)
    chosen = list(names) or list(registered_warmers())
    if not chosen:
        raise click.ClickException("no cache warmer is registered (pass -A APP to load them)")
    rows: list[dict[str, Any]] = []
    with click.progressbar(
        length=len(chosen), label="warming", file=sys.stderr, item_show_func=lambda n: n
    ) as bar:

        def progress(name: str, entry: dict[str, Any]) -> None:
            rows.append(entry)
            bar.update(1, name)

        try:
            report = run_warmers(runtime, chosen, progress=progress)
        except TaskyardError as exc:
            raise click.ClickException(str(exc)) from None
    runtime.redis.set(
        runtime.keys.cache_warm_last(), json.dumps({**report, "trigger": "cli", "skipped": False})
    )
    for entry in rows:
        status = f"error: {entry['error']}" if entry["error"] else "ok"
        echo(
            f"  {entry['name']:28} {entry['keys']:6d} keys  {entry['duration_s']:7.3f} s  {status}"
        )
    click.echo(
        f"warmed {report['keys']} keys with {len(rows)} warmers in {report['duration_s']:.3f} s"
    )
    if report["errors"]:
        sys.exit(1)


@cache.command("clear")
@click.option("--tag", required=True, help="Invalidate and delete every entry with this tag.")
@APP_OPTION
def cache_clear(tag: str, app_path: str | None) -> None:
    """Invalidate a tag at once, then delete its entries (with progress)."""
    from taskyard.cache.core import cache_for

    runtime = load_runtime(app_path, import_tasks=True)
    started = time.monotonic()
    interactive = sys.stderr.isatty()

    def progress(scanned: int, deleted: int) -> None:
        line = f"scanned {scanned} keys, deleted {deleted}"
        if interactive:
            click.echo("\r" + line, nl=False, err=True)
        elif scanned % 10_000 < 500:
            click.echo(line, err=True)

    deleted = cache_for(runtime).clear_tag(tag, progress=progress)
    if interactive:
        click.echo("", err=True)
    echo(
        f"tag {tag!r} invalidated; {deleted} entries deleted in {time.monotonic() - started:.2f} s"
    )


@cache.command("stats")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_stats_command(app_path: str | None, as_json: bool) -> None:
    """Hit rate and latency per cache namespace."""
    from taskyard.cache.core import cache_stats
    from taskyard.cli.output import table

    stats = cache_stats(load_runtime(app_path, import_tasks=True))
    if as_json:
        click.echo(json.dumps(stats, indent=2, default=str))
        return
    table(
        "cache",
        ["namespace", "hits", "misses", "hit rate", "avg latency"],
        [
            [
                namespace,
                f"{f['hits']:.0f}",
                f"{f['misses']:.0f}",
                f"{f['hit_rate_pct']:.1f} %",
                f"{f['avg_latency_ms']:.3f} ms",
            ]
            for namespace, f in stats.items()
        ],
    )
