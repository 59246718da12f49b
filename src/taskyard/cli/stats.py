"""``taskyard stats``: the live stats in a terminal, and one collection on demand."""

from __future__ import annotations

import json
from typing import Any

import click

from taskyard.cli.loader import APP_FLAG, APP_OPTION, load_runtime
from taskyard.cli.output import cell, records, table, when


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"


@click.group("stats")
@APP_FLAG
def stats() -> None:
    """Queue depths, workers, task counters and alerts from taskyard's stats."""


@stats.command("show")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def show(app_path: str | None, as_json: bool) -> None:
    """Print live queue depths, workers, per-task counters and firing alerts."""
    import redis

    from taskyard.monitoring.store import StatsStore

    store = StatsStore(load_runtime(app_path, default_name="taskyard-stats"))
    try:
        data = {
            "queues": store.queues(),
            "workers": store.workers(),
            "tasks": store.tasks(),
            "alerts": store.alerts(),
        }
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"stats unavailable: {exc}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    table(
        "queues",
        ["queue", "depth", "ready", "reserved", "scheduled"],
        [
            [
                q["queue"],
                str(q["depth"]),
                str(q["ready"]),
                str(q["reserved"]) if q.get("reserved_known", True) else "?",
                "?" if q.get("scheduled") is None else str(q["scheduled"]),
            ]
            for q in data["queues"]
        ],
    )
    table(
        "workers",
        ["worker", "alive", "age", "memory", "cpu", "paused"],
        [
            [
                str(w["hostname"]),
                "yes" if w["alive"] else "NO",
                _fmt(w.get("age_s"), " s"),
                _fmt(w.get("memory_pct"), " %"),
                _fmt(w.get("cpu_pct"), " %"),
                ",".join(w.get("paused_queues") or []) or "-",
            ]
            for w in data["workers"]
        ],
    )
    table(
        "tasks",
        ["task", "queue", "ok", "failed", "retried", "deferred", "run p95", "wait p95"],
        [
            [
                t["name"],
                t["queue"],
                str(t["succeeded"]),
                str(t["failed"]),
                str(t["retried"]),
                str(t["deferred"]),
                _fmt(t["runtime_p95"], " s"),
                _fmt(t["wait_p95"], " s"),
            ]
            for t in data["tasks"]
        ],
    )
    table(
        "firing alerts",
        ["severity", "alert", "since", "summary"],
        [[a["severity"], a["alertname"], when(a["since"]), a["summary"]] for a in data["alerts"]],
    )


@stats.command("collect")
@APP_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def collect_now(app_path: str | None, as_json: bool) -> None:
    """Run one stats collection now (as the periodic job does) and print its summary."""
    import redis

    from taskyard.monitoring.collect import collect

    try:
        summary = collect(load_runtime(app_path, default_name="taskyard-stats"))
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"collection failed: {exc}") from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    plain = {k: v for k, v in summary.items() if not isinstance(v, list | dict)}
    if "at" in plain:
        plain["at"] = when(plain["at"])
    table("collection", ["field", "value"], [[k, cell(v)] for k, v in plain.items()])
    for key, value in summary.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            records(key, value)
        elif isinstance(value, dict) and value:
            table(key, ["field", "value"], [[str(k), cell(v)] for k, v in value.items()])
        elif isinstance(value, list):
            table(key, ["value"], [[cell(v)] for v in value])
