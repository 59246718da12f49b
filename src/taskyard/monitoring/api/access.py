"""Who a request is and what it may do: users, the admin token, sessions, CSRF, the audit trail.

- Without users (a fresh install), the documented loopback default holds: reads answer anyone
  who can reach the API (bound to 127.0.0.1 by default), and every action needs the admin token
  (``TASKYARD_MONITORING__API_TOKEN``), as before.
- Once any user exists (``taskyard users add``), nothing but ``/health/*``, the login page, the
  static files and (``monitoring.metrics_public``, on by default) ``/metrics`` answers without
  credentials: a bearer token (a user's, or the admin token), or the session cookie the login
  page sets. Each route needs the least role of its action (users.Action).
- A request proved by the session cookie acts only with the session's CSRF token (the form's
  ``csrf_token`` field or an ``X-CSRF-Token`` header), so a page elsewhere cannot make the
  browser act. A bearer token is not sent by browsers on their own, so it needs none.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.types import ASGIApp, Receive, Scope, Send

from taskyard.monitoring.api.audit import AuditLog
from taskyard.monitoring.api.auth import bearer_scheme
from taskyard.monitoring.api.errors import unavailable
from taskyard.monitoring.api.users import (
    ADMIN_TOKEN_NAME,
    Action,
    Principal,
    Role,
    UserStore,
    same_secret,
)

#: The browser session's cookie.
SESSION_COOKIE = "taskyard_session"
#: Answered without credentials even when users exist: health, the login page, static files,
#: and the API's own documentation (no data in it).
PUBLIC_PREFIXES = ("/health/", "/login", "/static/", "/docs", "/redoc", "/openapi.json")
#: How long the "do any users exist" answer is reused (s): one Redis call per second at most.
USERS_CHECK_S = 1.0
#: How long a bearer token's or session's answer is reused (s): a removed token, a closed
#: session or a changed role takes effect within this, and a request costs no Redis call.
CREDENTIALS_CHECK_S = 1.0
#: Cached answers kept at most (a flood of made-up tokens empties the cache, never grows it).
MAX_CACHED_CREDENTIALS = 10_000

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="taskyard"'}
#: Who a request is when no user exists and it brings no token: the loopback default.
ANONYMOUS = Principal("anonymous", Role.OPERATOR, "loopback")


class Access:
    """Identifies requests and checks their actions; one per API instance."""

    def __init__(
        self,
        users: UserStore,
        audit: AuditLog,
        *,
        admin_token: str | None,
        metrics_public: bool = True,
    ) -> None:
        self.users = users
        self.audit = audit
        self.admin_token = admin_token or None
        self.metrics_public = metrics_public
        self._users_exist = (0.0, False)
        #: Token or session id -> (when the answer lapses, its principal or None): each
        #: credential is looked up in Redis at most once per CREDENTIALS_CHECK_S.
        self._credentials: dict[str, tuple[float, Principal | None]] = {}

    # --- who --------------------------------------------------------------------------------
    def users_exist(self) -> bool:
        checked_at, answer = self._users_exist
        now = time.monotonic()
        if now - checked_at > USERS_CHECK_S:
            answer = self.users.any()
            self._users_exist = (now, answer)
        return answer

    def forget_users_check(self) -> None:
        """Forget every cached answer (the users changed in this process)."""
        self._users_exist = (0.0, False)
        self._credentials.clear()

    def _cached(
        self, kind: str, credential: str, look_up: Callable[[str], Principal | None]
    ) -> Principal | None:
        key = kind + credential
        now = time.monotonic()
        hit = self._credentials.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = look_up(credential)
        if len(self._credentials) >= MAX_CACHED_CREDENTIALS:
            self._credentials.clear()
        self._credentials[key] = (now + CREDENTIALS_CHECK_S, principal)
        return principal

    def identify(self, request: Request) -> Principal | None:
        """Who ``request`` is: a bearer token, a session cookie, or (no users) anonymous.

        Raises:
            HTTPException: 403 for a bearer token that is no one's (never treated as absent).
        """
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            token = credential.strip()
            if self.admin_token is not None and same_secret(token, self.admin_token):
                return Principal(ADMIN_TOKEN_NAME, Role.ADMIN, "admin-token")
            principal = self._cached("t:", token, self.users.verify_token)
            if principal is None:
                hint = (
                    ""
                    if self.admin_token or self.users_exist()
                    else " (no admin token is configured: set TASKYARD_MONITORING__API_TOKEN, "
                    "or add a user with `taskyard users add`)"
                )
                raise HTTPException(403, f"wrong bearer token{hint}", headers=_CHALLENGE)
            return principal
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            principal = self._cached("s:", sid, self.users.session)
            if principal is not None:
                return principal
        return None if self.users_exist() else ANONYMOUS

    def public(self, path: str) -> bool:
        if path.startswith(PUBLIC_PREFIXES) or path in ("/login", "/logout"):
            return True
        return self.metrics_public and path == "/metrics"

    # --- what -------------------------------------------------------------------------------
    async def __call__(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
    ) -> Principal:
        """As a dependency itself: an operator's action (``Depends(state.auth)``).
        ``credentials`` documents the bearer scheme in the OpenAPI schema only."""
        return await self.check(request, Action.OPERATE)

    def require(self, action: Action) -> Callable[[Request], Awaitable[Principal]]:
        """A FastAPI dependency: the request's principal when it may do ``action``."""

        async def dependency(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),  # noqa: B008
        ) -> Principal:
            return await self.check(request, action)

        dependency.__name__ = f"require_{action.name.lower()}"
        return dependency

    async def check(self, request: Request, action: Action) -> Principal:
        principal = getattr(request.state, "principal", None) or self.identify(request)
        request.state.principal = principal
        if principal is None:
            raise HTTPException(401, "log in or send 'Authorization: Bearer <token>'", _CHALLENGE)
        if action is not Action.READ and action is not Action.VIEW_ARGUMENTS:
            if principal.via == "loopback":
                # No users: actions need the admin token, as they always did.
                detail = (
                    "this action needs the admin token ('Authorization: Bearer <token>')"
                    if self.admin_token
                    else "actions are disabled: add a user (`taskyard users add NAME --role "
                    "admin`) or set TASKYARD_MONITORING__API_TOKEN"
                )
                raise HTTPException(401 if self.admin_token else 403, detail, _CHALLENGE)
            if principal.via == "session":
                await self._check_csrf(request, principal)
        if not principal.may(action):
            raise HTTPException(
                403,
                f"{principal.role.label} {principal.name!r} may not {action.label} "
                f"(needs {action.role.label})",
            )
        return principal

    async def _check_csrf(self, request: Request, principal: Principal) -> None:
        given = request.headers.get("x-csrf-token")
        if given is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = await request.form()
            value = form.get("csrf_token")
            given = value if isinstance(value, str) else None
        if not given or principal.csrf is None or not same_secret(given, principal.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and retry")

    def may_view_arguments(self, request: Request) -> bool:
        principal = getattr(request.state, "principal", None)
        return principal is not None and principal.may(Action.VIEW_ARGUMENTS)

    def record(
        self,
        principal: Principal,
        action: str,
        *,
        target: str = "",
        count: int = 1,
        via: str = "api",
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.audit.record(
            actor=principal.name,
            role=principal.role.label,
            action=action,
            target=target,
            count=count,
            via=via,
            detail=detail,
        )


def principal_of(request: Request) -> Principal:
    """The principal a route's access dependency admitted."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise HTTPException(401, "not identified", _CHALLENGE)
    return principal


class LoginRequired:
    """Once users exist, every request but the public ones proves who it is; the principal is
    left in ``request.state.principal`` for the routes.

    A pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` runs each request's downstream
    app in a task of its own behind memory streams, which measured as most of an authenticated
    request's cost.
    """

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        refusal = self._refusal(request, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request, path: str) -> Response | None:
        """The answer to ``request`` when it may not go on (None: it may); sets the principal."""
        try:
            principal = self.access.identify(request)
        except (redis.RedisError, OSError) as exc:
            # Credentials cannot be checked: health answers on its own, the rest is a 503.
            if self.access.public(path):
                return None
            if path.startswith("/dashboard"):
                from taskyard.monitoring.dashboard.templating import render

                page = render(
                    "minimal.html",
                    title="unavailable",
                    message=f"Redis is unreachable, so credentials cannot be checked: {exc}",
                )
                return HTMLResponse(page, 503, headers={"Retry-After": "5"})
            return unavailable("redis", exc)
        except HTTPException as exc:
            if not self.access.public(path):
                return JSONResponse(
                    {"error": "forbidden", "detail": exc.detail},
                    exc.status_code,
                    headers=exc.headers,
                )
            principal = None
        request.state.principal = principal
        if principal is None and not self.access.public(path):
            if path.startswith("/dashboard"):
                query = request.url.query
                target = path + (f"?{query}" if query else "")
                return RedirectResponse(f"/login?next={_quote(target)}", 303)
            return JSONResponse(
                {"error": "unauthorized", "detail": "log in or send a bearer token"},
                401,
                headers=_CHALLENGE,
            )
        return None


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def safe_next(value: str | None) -> str:
    """Where to go after login: a path of this site only (never another origin)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/dashboard"
    return value
