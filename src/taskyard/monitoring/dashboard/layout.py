"""What every dashboard page shares: the header and its links, the time ranges, the CSS.

Pages load only the API's own files: the vendored uPlot and ``dashboard.js`` from
``/static/taskyard`` (no inline script, so the page's content policy allows scripts from this
server only). Time ranges are offered as far back as the history actually reaches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from taskyard.monitoring.api.docs import TASKYARD_STATIC
from taskyard.monitoring.dashboard.charts import clock, duration

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
#: The dashboard pages may load nothing from another host; the browser enforces it.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'"
)
#: Pages in the header, as (path, label); a page is linked only when its route exists.
PAGES: tuple[tuple[str, str], ...] = (
    ("/dashboard", "Overview"),
    ("/dashboard/workers", "Workers"),
    ("/dashboard/tasks", "Tasks"),
    ("/dashboard/dead", "Dead letters"),
)

CSS = """
body{font:14px system-ui,sans-serif;margin:0;background:#f3f4f6;color:#111827}
header{background:#111827;color:#fff;padding:8px 20px;display:flex;gap:18px;align-items:center;
flex-wrap:wrap}header h1{font-size:18px;margin:0}header a{color:#93c5fd;margin-right:8px}
header a.on{color:#fff;font-weight:600;text-decoration:none}header .ranges a.on{color:#fde68a}
main{padding:12px 20px}.muted{color:#6b7280}.grid{display:grid;gap:12px;
grid-template-columns:repeat(auto-fill,minmax(590px,1fr))}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0002}
.card.wide{grid-column:1/-1}.card h2{font-size:15px;margin:2px 0 8px}
.kpis{display:flex;gap:12px;margin:8px 0 12px;flex-wrap:wrap}
.kpi{background:#fff;border-radius:8px;padding:8px 16px;min-width:110px;box-shadow:0 1px 2px #0002}
.kpi span{display:block;color:#6b7280;font-size:12px}.kpi b{font-size:22px}
.kpi.warn b{color:#d97706}.kpi.bad b{color:#dc2626}
.legend{display:flex;gap:14px;font-size:12px;margin:2px 0 8px 52px;flex-wrap:wrap}
.legend i,.dot{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.alerts{list-style:none;padding:0;margin:0}
.alert{border-left:4px solid;padding:4px 10px;margin:4px 0;background:#fef2f2}
.alert.warning{background:#fffbeb}.ok{color:#16a34a;font-weight:600}
.problems{color:#b91c1c}table.tasks{border-collapse:collapse;width:100%;font-size:13px}
.tasks th,.tasks td{padding:3px 8px;border-bottom:1px solid #e5e7eb;text-align:left;
vertical-align:top}.tasks td.n{text-align:right;font-variant-numeric:tabular-nums}
.stale{color:#b91c1c}figure.tchart{margin:0 0 10px;min-height:240px}
figure.tchart figcaption{font-weight:600;font-size:12px;color:#374151;margin:0 0 2px}
.u-legend{font-size:12px}pre.tb{white-space:pre-wrap;font-size:12px;background:#f9fafb;
padding:8px;border:1px solid #e5e7eb;max-height:420px;overflow:auto}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
dl.kv dt{color:#6b7280}dl.kv dd{margin:0}
form.filters{display:flex;gap:10px;flex-wrap:wrap;align-items:end}
"""


def covered_since(store: Any) -> float | None:
    """Time of the oldest snapshot the store can show (Redis or the history database)."""
    import json

    from taskyard.monitoring import history

    oldest: float | None = None
    try:
        # Redis keeps the newest snapshots (newest first): the list's tail is its oldest.
        raw = store.redis.lindex(store.keys.series("overview"), -1)
        if raw:
            oldest = float(json.loads(raw)["at"])
        engine = getattr(store, "engine", None)
        if engine is not None:
            count = history.count_snapshots(engine, "overview")
            if count:
                rows = history.read_snapshots(engine, "overview", None, None, 1, count - 1)
                if rows:
                    at = float(rows[0]["at"])
                    oldest = at if oldest is None else min(oldest, at)
    except Exception:  # a coverage hint must never break the page
        logger.warning("dashboard: reading the history's coverage failed", exc_info=True)
    return oldest


def windows(covered: float | None, now: float) -> list[tuple[int, str]]:
    """The ranges worth offering: every one the history fills, and the first it does not."""
    span = now - covered if covered is not None else 0.0
    out: list[tuple[int, str]] = []
    for seconds, label in WINDOWS:
        out.append((seconds, label))
        if seconds >= span:
            break
    return out


def nav(request: Any, active: str, settings: Any) -> str:
    """Links to the dashboard pages that exist here, Flower and the API docs."""
    from taskyard.monitoring.flower import flower_url

    # Rendered outside a request (tests): every page.
    paths = {path for path, _ in PAGES} if request is None else route_paths(request.app.routes)
    links = [
        f'<a class="{"on" if path == active else ""}" href="{path}">{escape(label)}</a>'
        for path, label in PAGES
        if path in paths
    ]
    if settings is not None:
        links.append(f'<a href="{escape(flower_url(settings))}" rel="noreferrer">Flower</a>')
    links.append('<a href="/docs">API</a>')
    return "".join(links)


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


def ranges(request: Any, chosen: float, covered: float | None, now: float) -> str:
    """The time-range links of this page, keeping its other parameters."""
    given = request.query_params.items() if request is not None else ()
    params = {k: v for k, v in given if k not in ("window", "fragment")}
    out = []
    for seconds, label in windows(covered, now):
        query = urlencode({**params, "window": seconds})
        cls = "on" if int(chosen) == seconds else ""
        out.append(f'<a class="{cls}" href="?{escape(query)}">{label}</a>')
    since = (
        f"history since {clock(covered)} UTC ({duration(now - covered)})"
        if covered is not None
        else "no history yet"
    )
    return f'<span class="ranges">{"".join(out)}</span><span class="muted">{since}</span>'


def page(
    title: str,
    body: str,
    *,
    request: Any,
    active: str,
    settings: Any,
    refresh_s: int = 0,
    header_extra: str = "",
) -> str:
    """A whole dashboard page around ``body`` (the refreshable ``#board`` content)."""
    fallback = (
        f'<noscript><meta http-equiv="refresh" content="{refresh_s}"></noscript>'
        if refresh_s
        else ""
    )
    refresh = f"auto-refresh {refresh_s} s" if refresh_s else "auto-refresh off"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} · taskyard</title>{fallback}"
        f'<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{TASKYARD_STATIC}/uplot/uPlot.min.css">'
        f"<style>{CSS}</style></head>"
        f'<body data-refresh="{refresh_s}"><header><h1>taskyard</h1>'
        f"<nav>{nav(request, active, settings)}</nav>{header_extra}"
        f'<span class="muted">{refresh}</span><span id="stale" class="stale"></span></header>'
        f'<main id="board">{body}</main>'
        f'<script src="{TASKYARD_STATIC}/uplot/uPlot.iife.min.js"></script>'
        f'<script src="{TASKYARD_STATIC}/dashboard.js"></script></body></html>'
    )


def card(title: str, *parts: str, wide: bool = False) -> str:
    return (
        f'<section class="card{" wide" if wide else ""}"><h2>{escape(title)}</h2>'
        f"{''.join(parts)}</section>"
    )


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    table_id: str = "",
    empty: str = "nothing yet",
) -> str:
    """An HTML table; cells are already HTML (escape them when building the rows)."""
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return (
        f'<table class="tasks"{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


#: Key of the pages' own response cache in ``ApiState.extras``.
_PAGE_CACHE = "dashboard_page_cache"


async def respond_page(request: Any, key: Any, compute: Any) -> Any:
    """A dashboard page from the pages' cache, gzipped for clients that accept it.

    Pages are reused for half the stats interval (5 s by default), at least ``api_cache_s``:
    their charts change once per collection, and a page costs far more to build than an API
    answer. Built in a worker thread, one build per period however many browsers refresh.
    """
    from fastapi.responses import Response

    from taskyard.monitoring.api.query import Body, ResponseCache
    from taskyard.monitoring.api.state import GZIP_LEVEL, GZIP_MIN_BYTES

    state = request.app.state.taskyard
    cache = state.extras.get(_PAGE_CACHE)
    if cache is None:
        m = state.runtime.settings.monitoring
        cache = state.extras[_PAGE_CACHE] = ResponseCache(
            max(m.api_cache_s, m.stats_interval_s / 2) if m.api_cache_s > 0 else 0.0
        )
    body = await cache.get(key, lambda: Body.of(compute(), GZIP_MIN_BYTES, GZIP_LEVEL))
    media = "text/html; charset=utf-8"
    headers = {"Cache-Control": "no-store", "Content-Security-Policy": PAGE_POLICY}
    if body.gzipped is not None and "gzip" in request.headers.get("accept-encoding", ""):
        return Response(
            body.gzipped,
            media_type=media,
            headers={**headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"},
        )
    return Response(body.raw, media_type=media, headers=headers)
