"""``/dashboard/dead``: dead letters per queue, task and reason, the newest entries, dead batches;
filters; replay and purge (one, selected, every match) and a page per dead batch.

:func:`gather_dead` reads the dead-letter store into a :class:`DeadView`; :func:`render_dead` is
the pure seam tests render on sample data (``templates/dead.html``). Acting needs a logged-in
user of the right role (an operator replays, an admin purges): each form carries the session's
CSRF token, a first submit shows how many entries the action takes and asks to confirm, and
every action lands in the audit trail. Arguments are redacted, and withheld from viewers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.deadletters import DeadLetter
from taskyard.deadletters import Query as DeadQuery
from taskyard.deadletters.batches import batch_dead_letters
from taskyard.deadletters.entry import REASONS
from taskyard.deadletters.replay import replay, replay_one
from taskyard.errors import TaskyardError
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.state import ApiState
from taskyard.monitoring.api.users import Action
from taskyard.monitoring.dashboard.layout import (
    Shell,
    api_state,
    done_redirect,
    notice,
    page_response,
    session_principal,
    shell,
)
from taskyard.monitoring.dashboard.templating import render
from taskyard.redaction import REDACTED, redact_call

logger = logging.getLogger(__name__)

router = APIRouter()

#: Newest entries listed.
ENTRIES_LISTED = 100
#: Items of a dead batch its page lists at most.
MAX_BATCH_ITEMS = 10_000
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
    where: DeadFilter = field(default_factory=lambda: DeadFilter())
    #: Entries matching the filter (``entries`` lists the newest of them).
    matching: int = 0

    @property
    def total(self) -> int:
        return sum(c.entries for c in self.counts)


@dataclass(frozen=True)
class DeadFilter:
    """The page's filter: each given field must match (the store's indexed fields)."""

    name: str = ""
    queue: str = ""
    reason: str = ""
    exception: str = ""

    @classmethod
    def of(cls, values: Any) -> DeadFilter:
        def field_(key: str) -> str:
            value = values.get(key)
            return value.strip()[:300] if isinstance(value, str) else ""

        reason = field_("reason")
        return cls(
            field_("name"),
            field_("queue"),
            reason if reason in REASONS else "",
            field_("exception"),
        )

    @property
    def any(self) -> bool:
        return bool(self.name or self.queue or self.reason or self.exception)

    def query(self) -> DeadQuery:
        return DeadQuery(
            name=self.name or None,
            queue=self.queue or None,
            reason=self.reason or None,
            exception_type=self.exception or None,
        )

    def describe(self) -> str:
        pairs = [(k, v) for k, v in asdict(self).items() if v]
        return " ".join(f"{k}={v}" for k, v in pairs) or "all"


@dataclass(frozen=True)
class Controls:
    """What the asking user may do from the page, and the token their forms carry."""

    csrf: str = ""
    can_replay: bool = False
    can_purge: bool = False
    #: Why nothing can be done from here, when nothing can.
    why_not: str = ""

    @classmethod
    def of(cls, request: Request | None) -> Controls:
        principal = session_principal(request)
        if principal is None or principal.csrf is None:
            return cls(
                why_not="To replay or purge from this page, log in as an operator or admin "
                "(taskyard users add NAME --role operator); or use taskyard dead replay|purge."
            )
        return cls(principal.csrf, principal.may(Action.REPLAY), principal.may(Action.PURGE))


def gather_dead(
    state: ApiState,
    limit: int = ENTRIES_LISTED,
    where: DeadFilter | None = None,
    show_arguments: bool = True,
) -> DeadView:
    store = state.dead_letters()
    where = where or DeadFilter()
    counts = [
        DeadCount(queue, name, reason, n)
        for (queue, name, reason), n in sorted(store.counts().items(), key=lambda kv: -kv[1])
    ]
    batches = [DeadBatch.of(row) for row in batch_dead_letters(state.runtime)]
    pattern = state.runtime.settings.redact_pattern
    entries = [
        e.redacted(pattern, show_arguments=show_arguments)
        for e in store.search(where.query(), limit=limit)
    ]
    return DeadView(counts, entries, batches, where, store.count(where.query()))


def render_dead(
    view: DeadView, shell: Shell, controls: Controls | None = None, done: str = ""
) -> str:
    """The dead-letters page for ``view``."""
    return render(
        "dead.html",
        shell=shell,
        view=view,
        shown=ERROR_SHOWN,
        controls=controls or Controls(),
        done=done,
        reasons=REASONS,
    )


@router.get("/dashboard/dead", response_class=HTMLResponse, include_in_schema=False)
def dead_page(request: Request, done: str = "") -> Response:
    """The dead-letters page (thread pool: the store does blocking I/O; never cached: an
    operator checks it right after a replay or purge)."""
    state = api_state(request)
    page = shell(
        "dead letters", request=request, active="/dashboard/dead", settings=state.runtime.settings
    )
    try:
        view = gather_dead(
            state,
            where=DeadFilter.of(request.query_params),
            show_arguments=state.auth.may_view_arguments(request),
        )
    except Exception as exc:
        logger.warning("dead-letters page: store unreadable", exc_info=True)
        body = render("unavailable.html", shell=page, what="dead letters", error=str(exc))
        return page_response(request, Body(body.encode()), 503)
    html = render_dead(view, page, Controls.of(request), notice(request, done))
    return page_response(request, Body(html.encode()))


@router.post("/dashboard/dead/action", include_in_schema=False)
async def dead_action(request: Request) -> Response:
    """Replay or purge the selected entries or every match of the filter: the first submit
    shows the count and asks to confirm; the confirmed one acts and is audited."""
    state = api_state(request)
    form = await request.form()
    op = form.get("op")
    if op not in ("replay", "purge"):
        raise HTTPException(422, f"op={op!r}: expected replay or purge")
    principal = await state.auth.check(request, Action.REPLAY if op == "replay" else Action.PURGE)
    ids = [i[:300] for i in form.getlist("ids") if isinstance(i, str) and i][:10_000]
    where = DeadFilter.of(form)
    store = state.dead_letters()
    scope = "ids" if ids else "filter"
    count = len(ids) if ids else store.count(where.query())
    page = shell(
        "dead letters", request=request, active="/dashboard/dead", settings=state.runtime.settings
    )
    if form.get("confirm") != "yes":
        html = render(
            "dead_confirm.html",
            shell=page,
            op=op,
            ids=ids,
            where=where,
            count=count,
            csrf=principal.csrf or "",
        )
        return page_response(request, Body(html.encode()))
    app = state.celery()
    if op == "replay":
        if ids:
            done = sum(1 for i in ids if _replayed(app, store, i))
        else:
            done = len(replay(app, store, where.query()).replayed)
    else:
        done = store.delete(ids) if ids else store.purge(where.query())
    state.cache.clear()
    target = f"{len(ids)} selected" if ids else where.describe()
    state.auth.record(principal, f"dead.{op}", target=target, count=done, via="dashboard")
    verb = {"replay": "replayed", "purge": "purged"}[str(op)]
    message = f"{verb} {done} of {count} dead letter(s) ({scope}: {target})"
    return done_redirect(request, principal, "/dashboard/dead", message)


def _replayed(app: Any, store: Any, entry_id: str) -> bool:
    try:
        replay_one(app, store, entry_id)
    except TaskyardError:
        return False
    return True


@router.get(
    "/dashboard/dead/batch/{batch_name}/{batch_id}",
    response_class=HTMLResponse,
    include_in_schema=False,
)
def dead_batch_page(request: Request, batch_name: str, batch_id: str) -> Response:
    """Every item of one dead batch (redacted; withheld from viewers)."""
    state = api_state(request)
    page = shell(
        f"dead batch {batch_name}/{batch_id}",
        request=request,
        active="/dashboard/dead",
        settings=state.runtime.settings,
    )
    rows = [
        row
        for row in batch_dead_letters(state.runtime, batch_name[:200], items=MAX_BATCH_ITEMS)
        if str(row["batch_id"]) == batch_id
    ]
    if not rows:
        body = render("minimal.html", title="dead batch", message="no such dead batch")
        return page_response(request, Body(body.encode()), 404)
    row = rows[0]
    pattern = state.runtime.settings.redact_pattern
    if state.auth.may_view_arguments(request):
        items, _ = redact_call(list(row["items"]), {}, {}, pattern)
    else:
        items = [REDACTED for _ in row["items"]]
    html = render(
        "dead_batch.html",
        shell=page,
        batch=DeadBatch.of(row),
        name=batch_name,
        group=str(row.get("group", "")),
        items=[json.dumps(item, default=str) for item in items],
        more=max(0, int(row["size"]) - len(items)),
        controls=Controls.of(request),
    )
    return page_response(request, Body(html.encode()))
