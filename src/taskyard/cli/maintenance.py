"""``taskyard maintenance run``: index maintenance of the application database."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, load_runtime
from taskyard.cli.output import cell, echo, records, table
from taskyard.errors import TaskyardError


def _findings(title: str, found: Any) -> None:
    """One kind of finding as a table (a list of records), or one value per line."""
    items = list(found) if isinstance(found, list | tuple) else [found]
    if items and all(isinstance(item, dict) for item in items):
        records(title, items)
    else:
        table(title, ["value"], [[cell(item)] for item in items])


@click.group()
@APP_FLAG
def maintenance() -> None:
    """Index maintenance of the application database."""


@maintenance.command("run")
@click.option("--dry-run", is_flag=True, help="Print the statements; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@APP_OPTION
def maintenance_run(dry_run: bool, as_json: bool, app_path: str | None) -> None:
    """Create missing indexes, repair invalid ones, ANALYZE, report unused/duplicate/bloated."""
    from taskyard.maintenance import run_maintenance

    runtime = load_runtime(app_path, import_tasks=True)
    show = (lambda line: echo(line)) if dry_run and not as_json else None
    try:
        report = run_maintenance(runtime, dry_run=dry_run, echo=show)
    except TaskyardError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        echo(
            f"\nmaintenance {report.run_id} on {report.database} ({report.dialect})"
            f"{' DRY RUN' if dry_run else ''}: {report.status} in "
            f"{report.duration_s:.2f} s"
        )
        for action in report.actions:
            note = f"  ({action.error})" if action.error else ""
            echo(f"  {action.status:8} {action.kind:8} {action.target}{note}")
        echo("")
        for name in ("unused", "duplicates", "redundant", "invalid", "missing_tables"):
            found = report.findings.get(name)
            if found:
                _findings(name.replace("_", " "), found)
        bloated = [b for b in report.findings.get("bloat", []) if b["bloat_pct"] >= 20]
        if bloated:
            _findings("bloat >= 20 %", bloated)
        for error in report.errors:
            echo(f"  error: {error}", err=True)
    if report.status == "failed":
        sys.exit(1)
