"""``/dashboard/dead``: dead letters per queue, task and reason, the newest entries, dead batches.

:func:`gather_dead` reads the dead-letter store into a :class:`DeadView`; :func:`render_dead` is
the pure seam tests render on sample data (``templates/dead.html``). Replay and purge are the
JSON API's (``monitoring/api/dead.py``) and the CLI's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.deadletters import DeadLetter
from taskyard.deadletters.batches import batch_dead_letters
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.dashboard.layout import Shell, api_state, page_response, shell
from taskyard.monitoring.dashboard.templating import render

logger = logging.getLogger(__name__)

router = APIRouter()

#: Newest entries listed.
ENTRIES_LISTED = 100
#: Characters of an exception or batch error shown in a table cell.
ERROR_SHOWN = 160


@dataclass(frozen=True)
class DeadCount:
    queue: str
    name: str
    reason: str
    entries: int


@dataclass(frozen=True)
class DeadBatch:
    """A dead batch as the batching part reports it."""

    id: str
    reason: str
    size: int
    attempts: int
    error: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> DeadBatch:
        return cls(
            str(row["id"]), str(row["reason"]), int(row["size"]), int(row["attempts"]), row["error"]
        )


@dataclass(frozen=True)
class DeadView:
    counts: list[DeadCount]
    entries: list[DeadLetter]
    batches: list[DeadBatch]

    @property
    def total(self) -> int:
        return sum(c.entries for c in self.counts)


def gather_dead(state: ApiState, limit: int = ENTRIES_LISTED) -> DeadView:
    store = state.dead_letters()
    counts = [
        DeadCount(queue, name, reason, n)
        for (queue, name, reason), n in sorted(store.counts().items(), key=lambda kv: -kv[1])
    ]
    batches = [DeadBatch.of(row) for row in batch_dead_letters(state.runtime)]
    return DeadView(counts, list(store.search(limit=limit)), batches)


def render_dead(view: DeadView, shell: Shell) -> str:
    """The dead-letters page for ``view``."""
    return render("dead.html", shell=shell, view=view, shown=ERROR_SHOWN)


@router.get("/dashboard/dead", response_class=HTMLResponse, include_in_schema=False)
def dead_page(request: Request) -> Response:
    """The dead-letters page (thread pool: the store does blocking I/O; never cached: an
    operator checks it right after a replay or purge)."""
    state = api_state(request)
    page = shell(
        "dead letters", request=request, active="/dashboard/dead", settings=state.runtime.settings
    )
    try:
        view = gather_dead(state)
    except Exception as exc:
        logger.warning("dead-letters page: store unreadable", exc_info=True)
        body = render("unavailable.html", shell=page, what="dead letters", error=str(exc))
        return page_response(request, Body(body.encode()), 503)
    return page_response(request, Body(render_dead(view, page).encode()))
