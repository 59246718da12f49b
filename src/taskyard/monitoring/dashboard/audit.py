"""``/dashboard/audit``: the audit trail, newest first (admins; without users, anyone local)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from taskyard.monitoring.api.audit import AuditEntry
from taskyard.monitoring.api.query import Body
from taskyard.monitoring.api.users import Action
from taskyard.monitoring.dashboard.layout import Shell, api_state, page_response, shell
from taskyard.monitoring.dashboard.templating import render

router = APIRouter()

#: Entries listed on the page.
ENTRIES_LISTED = 200


def render_audit(entries: list[AuditEntry], shell: Shell, actor: str = "", action: str = "") -> str:
    return render("audit.html", shell=shell, entries=entries, actor=actor, action=action)


@router.get("/dashboard/audit", response_class=HTMLResponse, include_in_schema=False)
async def audit_page(request: Request, actor: str = "", action: str = "") -> Response:
    state = api_state(request)
    principal = getattr(request.state, "principal", None)
    if (
        principal is not None
        and principal.via != "loopback"
        and not principal.may(Action.READ_AUDIT)
    ):
        body = render("minimal.html", title="audit trail", message="the audit trail is for admins")
        return page_response(request, Body(body.encode()), 403)
    page = shell(
        "audit", request=request, active="/dashboard/audit", settings=state.runtime.settings
    )
    entries = state.auth.audit.recent(
        ENTRIES_LISTED, actor=actor[:200] or None, action=action[:200] or None
    )
    return page_response(request, Body(render_audit(entries, page, actor, action).encode()))
