"""What every dashboard page shares: the shell (header, links, time ranges) and the page cache.

Pages load only the API's own files: the vendored uPlot, ``dashboard.css`` and ``dashboard.js``
from ``/static/taskyard`` (no inline script, so the page's content policy allows scripts from
this server only). Time ranges are offered as far back as the history actually reaches. A page
is ``templates/<page>.html`` extending ``base.html`` (the whole page) or ``fragment.html`` (the
refreshable board only), chosen by :attr:`Shell.layout`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio
from fastapi import Query, Request
from fastapi.responses import RedirectResponse, Response
from redis.exceptions import RedisError

from taskyard.config import Settings
from taskyard.monitoring.api.query import Body, ResponseCache
from taskyard.monitoring.api.state import GZIP_LEVEL, GZIP_MIN_BYTES, ApiState, StatsSource
from taskyard.monitoring.api.users import Principal
from taskyard.monitoring.dashboard.charts import duration

logger = logging.getLogger(__name__)

#: Time ranges a page offers (s); each only while the history reaches that far back.
WINDOWS: tuple[tuple[int, str], ...] = (
    (900, "15 min"),
    (3600, "1 h"),
    (6 * 3600, "6 h"),
    (24 * 3600, "24 h"),
    (7 * 86_400, "7 d"),
    (30 * 86_400, "30 d"),
)
#: Pages in the header, as (path, label); a page is linked only when its route exists.
PAGES: tuple[tuple[str, str], ...] = (
    ("/dashboard", "Overview"),
    ("/dashboard/workers", "Workers"),
    ("/dashboard/tasks", "Tasks"),
    ("/dashboard/dead", "Dead letters"),
    ("/dashboard/flow", "Flow"),
    ("/dashboard/audit", "Audit"),
)


@dataclass(frozen=True)
class Link:
    """A link of the header: ``on`` marks the current page or range."""

    href: str
    label: str
    on: bool = False


@dataclass(frozen=True)
class Shell:
    """The page around a board: title, header links and ranges, refresh; ``fragment``: none of
    it, only the board (what ``dashboard.js`` swaps in on refresh)."""

    title: str
    nav: Sequence[Link] = ()
    flower: str | None = None
    refresh_s: int = 0
    ranges: Sequence[Link] = ()
    covered_since: float | None = None
    now: float | None = None
    note: str = ""
    fragment: bool = False
    #: Who is logged in ("" without users: the loopback default), and their role.
    user: str = ""
    role: str = ""

    @property
    def layout(self) -> str:
        return "fragment.html" if self.fragment else "base.html"


@dataclass(frozen=True)
class Window:
    """The time range a page shows and how far the history reaches (both s since epoch)."""

    seconds: float
    now: float
    covered_since: float | None = None
    params: dict[str, str] = field(default_factory=dict)


def covered_since(store: StatsSource) -> float | None:
    """Time of the oldest snapshot the store can show; None when unreadable (only a hint)."""
    try:
        return store.covered_since()
    except Exception:  # a coverage hint must never break the page
        logger.warning("dashboard: reading the history's coverage failed", exc_info=True)
        return None


def windows(covered: float | None, now: float) -> list[tuple[int, str]]:
    """The ranges worth offering: every one the history fills, and the first it does not."""
    span = now - covered if covered is not None else 0.0
    out: list[tuple[int, str]] = []
    for seconds, label in WINDOWS:
        out.append((seconds, label))
        if seconds >= span:
            break
    return out


def nav(request: Request | None, active: str) -> list[Link]:
    """Links to the dashboard pages that exist here (every page outside a request: tests)."""
    paths = {path for path, _ in PAGES} if request is None else route_paths(request.app.routes)
    return [Link(path, label, path == active) for path, label in PAGES if path in paths]


def route_paths(routes: Sequence[Any]) -> set[str]:
    """Paths of ``routes``, including those of included routers (unprefixed ones)."""
    paths: set[str] = set()
    for route in routes:
        if hasattr(route, "path"):
            paths.add(str(route.path))
        # FastAPI >= 0.16x keeps an included router as one entry wrapping the original.
        inner = getattr(route, "original_router", None)
        if inner is not None:
            paths |= route_paths(inner.routes)
    return paths


def ranges(params: dict[str, str], chosen: float, covered: float | None, now: float) -> list[Link]:
    """The time-range links of a page, keeping its other query parameters."""
    # A search or an action's message is not carried to another range.
    kept = {k: v for k, v in params.items() if k not in ("window", "fragment", "task", "done")}
    offered = windows(covered, now)
    if int(chosen) not in {seconds for seconds, _ in offered}:
        # The page's own window is always offered (and marked), even past the history's reach.
        label = dict(WINDOWS).get(int(chosen)) or duration(chosen)
        offered = sorted([*offered, (int(chosen), label)])
    return [
        Link("?" + urlencode({**kept, "window": seconds}), label, int(chosen) == seconds)
        for seconds, label in offered
    ]


def shell(
    title: str,
    *,
    request: Request | None,
    active: str,
    settings: Settings | None,
    refresh_s: int = 0,
    window: Window | None = None,
    note: str = "",
    fragment: bool = False,
) -> Shell:
    """The shell of a page served for ``request`` (``None``: outside a request, for tests)."""
    from taskyard.monitoring.flower import flower_url

    if fragment:
        return Shell(title, fragment=True)
    principal = getattr(request.state, "principal", None) if request is not None else None
    user = role = ""
    if principal is not None and principal.via == "session":
        user, role = principal.name, principal.role.label
    return Shell(
        title,
        user=user,
        role=role,
        nav=nav(request, active),
        flower=flower_url(settings) if settings is not None else None,
        refresh_s=refresh_s,
        ranges=(
            ranges(window.params, window.seconds, window.covered_since, window.now)
            if window is not None
            else ()
        ),
        covered_since=window.covered_since if window is not None else None,
        now=window.now if window is not None else None,
        note=note,
    )


def session_principal(request: Request | None) -> Principal | None:
    """The user behind ``request`` when a logged-in browser session (with its CSRF token) made
    it: the only requests a page's forms may act for. None for tokens and anonymous reads."""
    principal = getattr(request.state, "principal", None) if request is not None else None
    if principal is None or principal.via != "session" or principal.csrf is None:
        return None
    return principal  # type: ignore[no-any-return]


#: How long what a form did waits for the page its redirect goes to (s).
NOTICE_TTL_S = 300
#: Longest notice kept and shown (characters).
NOTICE_MAX = 300


def done_redirect(request: Request, principal: Principal, path: str, message: str) -> Response:
    """Back to ``path`` (303) with what a form did, for ``principal`` only.

    The message stays in Redis under a random token and the redirect carries the token, so a
    link made elsewhere (``?done=...``) cannot put its own words on an operator's page: a page
    shows a notice only when it was left for the user viewing it. When Redis refuses, the page
    comes back without one (the action itself is done and audited).
    """
    state = api_state(request)
    token = secrets.token_urlsafe(16)
    record = json.dumps({"user": principal.name, "message": message[:NOTICE_MAX]})
    try:
        state.runtime.redis.set(state.runtime.keys.notice(token), record, ex=NOTICE_TTL_S)
    except RedisError:
        # The message names what an operator typed (filters, task names): not for the log.
        logger.warning("dashboard: notice of a %s action not kept", path, exc_info=True)
        return RedirectResponse(path, 303)
    return RedirectResponse(f"{path}?{urlencode({'done': token})}", 303)


def notice(request: Request, token: str) -> str:
    """What a form left under ``token`` for the user viewing ``request``; "" for an unknown,
    expired or malformed token, another user's notice, or when Redis cannot say."""
    principal = getattr(request.state, "principal", None)
    if not token or len(token) > 64 or principal is None:
        return ""
    state = api_state(request)
    try:
        raw = state.runtime.redis.get(state.runtime.keys.notice(token))
    except RedisError:
        return ""
    try:
        record = json.loads(raw) if raw else None
    except ValueError:
        return ""
    if not isinstance(record, dict) or record.get("user") != principal.name:
        return ""
    return str(record.get("message") or "")[:NOTICE_MAX]


def api_state(request: Request) -> ApiState:
    """The API's shared state (store, runtime) behind a dashboard route."""
    state: ApiState = request.app.state.taskyard
    return state


#: Key of the pages' own response cache in ``ApiState.extras``.
_PAGE_CACHE = "dashboard_page_cache"


async def respond_page(request: Request, key: Hashable, compute: Callable[[], str]) -> Response:
    """A dashboard page from the pages' cache, gzipped for clients that accept it.

    Pages are reused for half the stats interval (5 s by default), at least ``api_cache_s``:
    their charts change once per collection, and a page costs far more to build than an API
    answer. Built in a worker thread, one build per period however many browsers refresh. The
    content policy and ``nosniff`` are added by the API's SecurityHeaders middleware.
    """
    state = api_state(request)
    cache = state.extras.get(_PAGE_CACHE)
    if cache is None:
        m = state.runtime.settings.monitoring
        cache = state.extras[_PAGE_CACHE] = ResponseCache(
            max(m.api_cache_s, m.stats_interval_s / 2) if m.api_cache_s > 0 else 0.0
        )
    # Pages differ by who asks (the header names them; a viewer sees no arguments).
    principal = getattr(request.state, "principal", None)
    who = (principal.name, principal.role) if principal is not None else None
    body = await cache.get(
        (key, who), lambda: Body.of(compute().encode(), GZIP_MIN_BYTES, GZIP_LEVEL)
    )
    return page_response(request, body)


def forget_pages(state: ApiState) -> None:
    """Drop every cached page and API answer (an action changed what they show)."""
    cache = state.extras.get(_PAGE_CACHE)
    if cache is not None:
        cache.clear()
    state.cache.clear()


def page_response(request: Request, body: Body, status_code: int = 200) -> Response:
    media = "text/html; charset=utf-8"
    headers = {"Cache-Control": "no-store"}
    if body.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return Response(body.gzipped, status_code, headers, media)
    return Response(body.raw, status_code, headers, media)


def flower_base(settings: Settings) -> str:
    """Flower's URL (ending in "/"): pages link to its task and worker pages."""
    from taskyard.monitoring.flower import flower_url

    return flower_url(settings)


async def windowed(
    request: Request,
    key: tuple[Hashable, ...],
    title: str,
    active: str,
    render_board: Callable[[ApiState, Window, Shell], str],
    window: int,
    refresh: int,
    fragment: bool,
    status_code: int = 200,
) -> Response:
    """A page over a window of history, cached under ``key`` with the window, refresh and
    fragment: ``render_board(state, window, shell)`` reads the store and renders the page.
    A page of another status than 200 (a refused input on it) is built anew, never cached."""
    state = api_state(request)

    def compute() -> str:
        now = time.time()
        span = Window(
            float(window),
            now,
            None if fragment else covered_since(state.store),
            dict(request.query_params),
        )
        page = shell(
            title,
            request=request,
            active=active,
            settings=state.runtime.settings,
            refresh_s=refresh,
            window=span,
            fragment=fragment,
        )
        return render_board(state, span, page)

    if status_code != 200:
        html = await anyio.to_thread.run_sync(compute)
        return page_response(request, Body(html.encode()), status_code)
    return await respond_page(request, (*key, window, refresh, fragment), compute)


WindowQuery = Annotated[int, Query(ge=60, le=30 * 86_400, description="Seconds of history.")]
RefreshQuery = Annotated[int, Query(ge=0, le=3600, description="Seconds; 0: off.")]
FragmentQuery = Annotated[bool, Query(description="Only the board, for the refresh.")]
