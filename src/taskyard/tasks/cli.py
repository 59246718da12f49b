"""``taskyard maintenance run`` and ``taskyard cache warm|clear|stats``."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from taskyard.errors import TaskyardError
from taskyard.runtime import Runtime, runtime_of

APP_OPTION = click.option(
    "-A", "--app", "app_path", default=None, metavar="APP",
    help="Celery app (as for `celery -A`) whose modules register warmers; default: settings only.")


def _runtime(app_path: str | None) -> Runtime:
    try:
        if app_path:
            from celery.app.utils import find_app

            app = find_app(app_path)
            # Warmers live in the app's task modules: import them as a worker would.
            app.loader.import_default_modules()
        else:
            from taskyard.app import create_app

            app = create_app("taskyard")
        return runtime_of(app)
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def maintenance() -> None:
    """Index maintenance of the application database."""


@maintenance.command("run")
@click.option("--dry-run", is_flag=True, help="Print the statements; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@APP_OPTION
def maintenance_run(dry_run: bool, as_json: bool, app_path: str | None) -> None:
    """Create missing indexes, repair invalid ones, ANALYZE, report unused/duplicate/bloated."""
    from taskyard.tasks.maintenance import run_maintenance

    runtime = _runtime(app_path)
    echo = (lambda line: click.echo(line)) if dry_run and not as_json else None
    try:
        report = run_maintenance(runtime, dry_run=dry_run, echo=echo)
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        click.echo(f"\nmaintenance {report.run_id} on {report.database} ({report.dialect})"
                   f"{' DRY RUN' if dry_run else ''}: {report.status} in "
                   f"{report.duration_s:.2f} s")
        for action in report.actions:
            note = f"  ({action.error})" if action.error else ""
            click.echo(f"  {action.status:8} {action.kind:8} {action.target}{note}")
        for name in ("unused", "duplicates", "redundant", "invalid", "missing_tables"):
            found = report.findings.get(name)
            if found:
                click.echo(f"  {name}: {json.dumps(found, default=str)}")
        bloated = [b for b in report.findings.get("bloat", []) if b["bloat_pct"] >= 20]
        if bloated:
            click.echo(f"  bloat >= 20 %: {json.dumps(bloated)}")
        for error in report.errors:
            click.echo(f"  error: {error}", err=True)
    if report.status == "failed":
        sys.exit(1)


@click.group()
def cache() -> None:
    """The Redis cache: warm it, clear a tag, show statistics."""


@cache.command("warm")
@click.option("--name", "names", multiple=True, help="Run only this warmer (repeatable).")
@APP_OPTION
def cache_warm(names: tuple[str, ...], app_path: str | None) -> None:
    """Run the registered cache warmers now and report keys warmed and time taken."""
    from taskyard.tasks.warming import registered_warmers, run_warmers

    runtime = _runtime(app_path)
    chosen = list(names) or list(registered_warmers())
    if not chosen:
        raise click.ClickException("no cache warmer is registered (pass -A APP to load them)")
    rows: list[dict[str, Any]] = []
    with click.progressbar(length=len(chosen), label="warming", file=sys.stderr,
                           item_show_func=lambda n: n) as bar:
        def progress(name: str, entry: dict[str, Any]) -> None:
            rows.append(entry)
            bar.update(1, name)

        try:
            report = run_warmers(runtime, chosen, progress=progress)
        except TaskyardError as exc:
            raise click.ClickException(str(exc)) from None
    runtime.redis.set(runtime.keys.cache_warm_last(),
                      json.dumps({**report, "trigger": "cli", "skipped": False}))
    for entry in rows:
        status = f"error: {entry['error']}" if entry["error"] else "ok"
        click.echo(f"  {entry['name']:28} {entry['keys']:6d} keys  {entry['duration_s']:7.3f} s"
                   f"  {status}")
    click.echo(f"warmed {report['keys']} keys with {len(rows)} warmers in "
               f"{report['duration_s']:.3f} s")
    if report["errors"]:
        sys.exit(1)


@cache.command("clear")
@click.option("--tag", required=True, help="Invalidate and delete every entry with this tag.")
@APP_OPTION
def cache_clear(tag: str, app_path: str | None) -> None:
    """Invalidate a tag at once, then delete its entries (with progress)."""
    from taskyard.tasks.cache import cache_for

    runtime = _runtime(app_path)
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
    click.echo(f"tag {tag!r} invalidated; {deleted} entries deleted in "
               f"{time.monotonic() - started:.2f} s")


@cache.command("stats")
@APP_OPTION
def cache_stats_command(app_path: str | None) -> None:
    """Hit rate and latency per cache namespace."""
    from taskyard.tasks.cache import cache_stats

    stats = cache_stats(_runtime(app_path))
    if not stats:
        click.echo("no cache statistics yet")
    for namespace, figures in stats.items():
        click.echo(f"  {namespace:16} hits {figures['hits']:.0f}  misses {figures['misses']:.0f}"
                   f"  hit rate {figures['hit_rate_pct']:.1f} %  "
                   f"avg {figures['avg_latency_ms']:.3f} ms")
