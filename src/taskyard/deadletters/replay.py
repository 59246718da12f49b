"""Replay of dead letters: one entry, every entry a query matches, or all.

A replayed task is sent again under a new id, to the queue it died on (its own level), and
carries the ``taskyard_replay_of`` header naming the entry; the entry stays, marked "replayed"
with the new id, so the link resolves. Marking happens first and atomically (one replay wins
when two operators replay at once); a send that fails puts the entry back as it was.

A poison message is replayed only when its task was unknown to the worker (deployed since):
its raw body and headers are published again. Other poison messages cannot become tasks.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from taskyard.deadletters.entry import REPLAY_HEADER, DeadLetter, Query
from taskyard.deadletters.store import DeadLetterStore
from taskyard.errors import DeadLetterError
from taskyard.routing.levels import LEVEL_NAMES
from taskyard.runtime import TaskyardApp

#: progress(done, total, entry id): called after each entry of a bulk replay.
Progress = Callable[[int, int, str], None]


@dataclass(slots=True)
class ReplayReport:
    """What a bulk replay did: entry id -> new task id, and the entries it could not replay."""

    replayed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _queue_of(app: TaskyardApp, entry: DeadLetter) -> str | None:
    if entry.queue in LEVEL_NAMES or entry.queue in (app.amqp.queues or {}):
        return entry.queue
    return None  # the app's routing places it


def check_replayable(entry: DeadLetter) -> None:
    """Raise when ``entry`` cannot be sent again, saying why."""
    if entry.state != "dead":
        raise DeadLetterError(
            f"dead letter {entry.id} was already replayed as {entry.replayed_as}", value=entry.id
        )
    if entry.reason == "poison":
        if not entry.detail.startswith("unknown task") or not entry.body:
            raise DeadLetterError(
                f"dead letter {entry.id} is a poison message ({entry.detail});"
                " it cannot become a task: purge it",
                value=entry.id,
            )
        if not entry.replayable:
            raise DeadLetterError(
                f"dead letter {entry.id}: its body was cut to the size cap, "
                "so it cannot be sent again",
                value=entry.id,
            )
        return
    if not entry.replayable:
        raise DeadLetterError(
            f"dead letter {entry.id}: its arguments were cut to the size cap "
            "or are not JSON, so it cannot be sent again",
            value=entry.id,
        )
    if not entry.name:
        raise DeadLetterError(f"dead letter {entry.id} names no task", value=entry.id)


def _send(app: TaskyardApp, entry: DeadLetter, new_id: str) -> None:
    queue = _queue_of(app, entry)
    if entry.reason == "poison":
        raw = (
            entry.body.encode() if entry.body_encoding == "utf-8" else base64.b64decode(entry.body)
        )
        headers = {**entry.headers, "id": new_id, REPLAY_HEADER: entry.id}
        with app.producer_or_acquire() as producer:
            producer.publish(
                raw,
                exchange=app.conf.task_default_exchange,
                routing_key=queue or app.conf.task_default_routing_key,
                content_type=entry.content_type,
                content_encoding=entry.content_encoding or "utf-8",
                headers=headers,
                retry=True,
            )
        return
    options: dict[str, Any] = {"task_id": new_id, "headers": {REPLAY_HEADER: entry.id}}
    if queue is not None:
        options.update(queue=queue, routing_key=queue)
    app.send_task(
        entry.name, args=json.loads(entry.args), kwargs=json.loads(entry.kwargs), **options
    )


def replay_one(app: TaskyardApp, store: DeadLetterStore, entry_id: str) -> str:
    """Send dead entry ``entry_id`` again; returns the new task id.

    Raises:
        DeadLetterError: no such entry, already replayed, or it cannot be sent again.
    """
    entry = store.get(entry_id)
    if entry is None:
        raise DeadLetterError(f"no dead letter {entry_id!r}", value=entry_id)
    check_replayable(entry)
    new_id = str(uuid.uuid4())
    if not store.mark_replayed(entry.id, new_id):
        raise DeadLetterError(f"dead letter {entry_id} was replayed meanwhile", value=entry_id)
    try:
        _send(app, entry, new_id)
    except Exception:
        # Not sent: back to what it was (record merges, so undo its times + 1).
        store.record(replace(entry, times=max(1, entry.times - 1)))
        raise
    return new_id


def replay(
    app: TaskyardApp,
    store: DeadLetterStore,
    query: Query | None = None,
    *,
    progress: Progress | None = None,
    limit: int | None = None,
) -> ReplayReport:
    """Replay every dead entry ``query`` matches (all dead entries by default), oldest first."""
    query = query or Query()
    if query.state not in (None, "dead"):
        raise DeadLetterError(
            f"only dead entries can be replayed, not state={query.state!r}", value=query.state
        )
    query = replace(query, state="dead")
    ids = [e.id for e in store.iter(query)]
    ids.reverse()  # oldest first: the order they died in
    if limit is not None:
        ids = ids[:limit]
    report = ReplayReport()
    for done, entry_id in enumerate(ids, 1):
        try:
            report.replayed[entry_id] = replay_one(app, store, entry_id)
        except DeadLetterError as exc:
            report.skipped[entry_id] = str(exc)
        if progress is not None:
            progress(done, len(ids), entry_id)
    return report
