"""Batch dead letters beside the task store: one listing, replay and purge for both.

A dead batch keeps its items where batching keeps them (``batching/inspect.py``), so requeueing
it needs no copy; this module shows it in the shape of a task entry (``kind`` "batch", id
``<batch name>/<batch id>``) and routes replay and purge to batching's own calls.
"""

from __future__ import annotations

from typing import Any

from taskyard.batching.inspect import batch_names, list_dead, purge_dead, requeue_dead
from taskyard.errors import DeadLetterError
from taskyard.runtime import TaskyardApp


def batch_dead_letters(
    app: TaskyardApp, batch_name: str | None = None, *, items: int = 3, limit: int = 1000
) -> list[dict[str, Any]]:
    """Dead batches as rows beside task entries, newest death first."""
    rows = []
    for dead in list_dead(app, batch_name, items=items, limit=limit):
        error = str(dead.get("error", ""))
        rows.append(
            {
                "kind": "batch",
                "id": f"{dead['batch_name']}/{dead['batch_id']}",
                "batch_name": dead["batch_name"],
                "batch_id": dead["batch_id"],
                "group": dead["group"],
                "size": dead["size"],
                "reason": "crashed" if error.startswith("crashed") else "failed",
                "error": error,
                "attempts": dead["attempts"],
                "deliveries": dead["deliveries"],
                "last_at": dead["died_at"],
                "items": dead["items"],
            }
        )
    rows.sort(key=lambda row: row["last_at"], reverse=True)
    return rows


def _split(batch_ref: str) -> tuple[str, list[str] | None]:
    """ "name" -> every dead batch of name; "name/id" -> that one."""
    name, sep, batch_id = batch_ref.partition("/")
    if not name:
        raise DeadLetterError(f"batch {batch_ref!r}: expected NAME or NAME/ID", value=batch_ref)
    return name, ([batch_id] if sep else None)


def replay_batches(app: TaskyardApp, batch_ref: str | None = None) -> list[str]:
    """Requeue dead batches ("name", "name/id", or every name when None); their refs."""
    refs: list[str] = []
    targets = [_split(batch_ref)] if batch_ref else [(n, None) for n in batch_names(app)]
    for name, ids in targets:
        refs.extend(f"{name}/{i}" for i in requeue_dead(app, name, ids))
    return refs


def purge_batches(app: TaskyardApp, batch_ref: str | None = None) -> int:
    """Delete dead batches for good ("name", "name/id", or all); returns items deleted."""
    targets = [_split(batch_ref)] if batch_ref else [(n, None) for n in batch_names(app)]
    return sum(purge_dead(app, name, ids) for name, ids in targets)
