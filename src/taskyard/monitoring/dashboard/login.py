"""``/login`` and ``/logout``: a browser session for the dashboard's users.

The session is a random cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS) whose
SHA-256 keys the session in Redis; its CSRF token goes into every form that acts. A wrong name
and a wrong password give the same answer in the same time (users.UserStore.verify_password).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from taskyard.monitoring.api.access import SESSION_COOKIE, principal_of, safe_next
from taskyard.monitoring.api.users import same_secret
from taskyard.monitoring.dashboard.layout import api_state
from taskyard.monitoring.dashboard.templating import render

router = APIRouter()


def render_login(next_path: str, problem: str = "") -> str:
    return render("login.html", title="log in", next=next_path, problem=problem)


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(next: str | None = None) -> HTMLResponse:
    return HTMLResponse(render_login(safe_next(next)), headers={"Cache-Control": "no-store"})


@router.post("/login", include_in_schema=False)
def log_in(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=2000)] = "/dashboard",
) -> Response:
    access = api_state(request).auth
    principal = access.users.verify_password(username, password)
    if principal is None:
        return HTMLResponse(
            render_login(safe_next(next), "wrong name or password"),
            401,
            headers={"Cache-Control": "no-store"},
        )
    sid, _ = access.users.open_session(principal)
    access.record(principal, "session.login", via="dashboard")
    response = RedirectResponse(safe_next(next), 303)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=int(access.users.session_ttl_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.get("/logout", response_class=HTMLResponse, include_in_schema=False)
def logout_page(request: Request) -> Response:
    principal = getattr(request.state, "principal", None)
    if principal is None or principal.csrf is None:
        return RedirectResponse("/login", 303)
    return HTMLResponse(
        render("logout.html", title="log out", user=principal.name, csrf=principal.csrf),
        headers={"Cache-Control": "no-store"},
    )


@router.post("/logout", include_in_schema=False)
async def log_out(request: Request) -> Response:
    access = api_state(request).auth
    principal = getattr(request.state, "principal", None)
    if principal is not None and principal.via == "session":
        form = await request.form()
        token = form.get("csrf_token")
        if (
            not isinstance(token, str)
            or not principal.csrf
            or not same_secret(token, principal.csrf)
        ):
            return HTMLResponse("missing or wrong CSRF token", 403)
        access.users.close_session(request.cookies.get(SESSION_COOKIE, ""))
        access.forget_users_check()  # the closed session is refused at once, not within 1 s
        access.record(principal_of(request), "session.logout", via="dashboard")
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
