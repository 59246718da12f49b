"""The overview: pure rendering of typed sample data through the templates, and the route."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from taskyard.config import load_settings
from taskyard.monitoring.api import models as m
from taskyard.monitoring.api.headers import SecurityHeaders
from taskyard.monitoring.dashboard import charts, series_charts
from taskyard.monitoring.dashboard import overview as dashboard
from taskyard.monitoring.dashboard.rows import Thresholds, typed
from taskyard.monitoring.dashboard.rows import series_of as typed_series
from taskyard.monitoring.dashboard.templating import render_chart

LEVELS = ["critical", "high", "normal", "low", "batch"]
NOW = 1_800_000_000.0
THRESHOLDS = Thresholds()


def sample(now: float = NOW, points: int = 30) -> dict[str, Any]:
    """Data in the shapes StatsStore returns and the stats collection writes."""
    queues_series, throughput, latency, workers_series, batches_series = [], [], [], [], []
    for i in range(points):
        at = now - 10 * i
        queues_series.append(
            {
                "at": at,
                "queues": {
                    lv: {"depth": (i * (k + 1)) % 40, "ready": (i * (k + 1)) % 40, "reserved": 0}
                    for k, lv in enumerate(LEVELS)
                },
            }
        )
        throughput.append(
            {
                "at": at,
                "per_s": 12.0 + i % 5,
                "succeeded_per_s": 11.0 + i % 5,
                "failed_per_s": 1.0,
                "received_per_s": 13.0,
                "window_s": 10.0,
            }
        )
        latency.append(
            {
                "at": at,
                "runtime_p50": 0.004,
                "runtime_p95": 0.02 + i / 1000,
                "runtime_p99": 0.09,
                "wait_p50": 0.01,
                "wait_p95": 0.2,
                "wait_p99": None if i == 7 else 0.5,
            }
        )
        workers_series.append(
            {
                "at": at,
                "workers": [
                    {"hostname": "critical@h", "alive": True, "memory_pct": 40 + i, "cpu_pct": 20.0}
                ],
            }
        )
        batches_series.append(
            {
                "at": at,
                "batches": [
                    {"batch_name": "emails", "buffered": i, "in_flight_items": 1, "dead": 0}
                ],
            }
        )
    return {
        "now": now,
        "window_s": 3600.0,
        "thresholds": THRESHOLDS,
        "problems": [],
        "queues": [
            {"queue": lv, "depth": 5 + k, "ready": 4 + k, "reserved": 1}
            for k, lv in enumerate(LEVELS)
        ],
        "workers": [
            {
                "hostname": "critical@h",
                "pid": 10,
                "alive": True,
                "age_s": 1.2,
                "memory_pct": 93.5,
                "cpu_pct": 12.0,
                "state": "critical",
                "queues": ["critical", "high"],
                "paused_queues": ["low", "batch"],
            },
            {"hostname": "batch@h", "pid": 11, "alive": False, "age_s": 45.0, "memory_pct": None},
        ],
        "tasks": [
            {
                "name": "bdc.tasks.send",
                "queue": "high",
                "received": 10,
                "started": 10,
                "succeeded": 9,
                "failed": 1,
                "retried": 0,
                "deferred": 2,
                "runtime_p50": 0.004,
                "runtime_p95": 0.05,
                "runtime_p99": 1.5,
                "wait_p50": 0.01,
                "wait_p95": 0.2,
                "wait_p99": None,
            }
        ],
        "batches": [
            {
                "batch_name": "emails",
                "buffered": 42,
                "oldest_age_s": 1.0,
                "in_flight": 1,
                "in_flight_items": 3,
                "dead": 1,
            }
        ],
        "alerts": [
            {
                "id": "WorkerMemoryHigh{hostname=critical@h}",
                "alertname": "WorkerMemoryHigh",
                "severity": "critical",
                "state": "firing",
                "since": now - 120,
                "summary": "memory 93.5% above 90% on <critical@h>",
            }
        ],
        "cache": [
            {"namespace": "user", "hits": 90, "misses": 10, "hit_rate_pct": 90.0},
            {"namespace": "analytics", "hits": 10, "misses": 30, "hit_rate_pct": 25.0},
        ],
        "series": {
            "queues": queues_series,
            "throughput": throughput,
            "latency": latency,
            "workers": workers_series,
            "batches": batches_series,
        },
    }


def as_data(raw: dict[str, Any]) -> dashboard.OverviewData:
    """:func:`sample`'s rows as the typed data :func:`dashboard.gather` hands the page."""
    return dashboard.OverviewData(
        now=raw["now"],
        window_s=raw["window_s"],
        thresholds=raw["thresholds"],
        problems=list(raw["problems"]),
        queues=typed(m.QueueStats, raw["queues"]),
        workers=typed(m.WorkerStats, raw["workers"]),
        tasks=typed(m.TaskStats, raw["tasks"]),
        batches=typed(m.BatchStats, raw["batches"]),
        alerts=typed(m.Alert, raw["alerts"]),
        alert_changes=typed(m.AlertChange, raw.get("alert_changes", [])),
        cache=typed(m.CacheStats, raw.get("cache", [])),
        series=typed_series(raw["series"]),
    )


def svg_of(chart: charts.BarChart) -> ET.Element:
    """A bar chart rendered by its macro, parsed as XML (so it is well-formed)."""
    return ET.fromstring(render_chart(chart))


def svgs(html: str) -> list[ET.Element]:
    """Every <svg> of a page, parsed as XML (so each is well-formed)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


SVG = "{http://www.w3.org/2000/svg}"


def tcharts(html: str) -> dict[str, dict[str, Any]]:
    """Every uPlot time chart of a page: title -> its data (the JSON the browser draws)."""
    import json

    found = re.findall(
        r'<figure class="tchart"[^>]*>.*?<script type="application/json">(.*?)'
        r"</script></figure>",
        html,
        flags=re.S,
    )
    specs = [json.loads(raw) for raw in found]
    return {spec["title"]: spec for spec in specs}


def series_of(spec: dict[str, Any], label: str) -> list[float | None]:
    return next(s["values"] for s in spec["series"] if s["label"] == label)


def test_page_has_a_chart_per_view_all_levels_and_the_firing_alert() -> None:
    html = dashboard.render_page(as_data(sample()), refresh_s=5)
    bars = [c.find(f"{SVG}title").text for c in svgs(html)]  # type: ignore[union-attr]
    lines = tcharts(html)
    for title in ("Batch buffers now (items)", "Worker resources (percent of limit)"):
        assert title in bars
    for title in (
        "Queue depth per level (messages)",
        "Throughput (tasks per second)",
        "Run time percentiles",
        "Queue wait percentiles",
        "Memory per worker (percent of limit)",
        "CPU per worker (percent of limit)",
    ):
        assert title in lines, sorted(lines)
    depth = lines["Queue depth per level (messages)"]
    assert [s["label"] for s in depth["series"]] == LEVELS
    assert len(depth["x"]) == 30 and all(len(s["values"]) == 30 for s in depth["series"])
    # Every time chart has a hover title with each line's latest value.
    assert 'title="Queue depth per level (messages) (latest) · critical: 0 msg ·' in html
    assert "WorkerMemoryHigh" in html and "CRITICAL" in html
    # Alert text is escaped, never markup.
    assert "&lt;critical@h&gt;" in html and "<critical@h>" not in html
    assert 'http-equiv="refresh" content="5"' in html and 'data-refresh="5"' in html
    assert "bdc.tasks.send" in html and "1.5 s" in html
    # Nothing is loaded from anywhere: no external src/href; no inline script either.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert re.findall(r'<script src="([^"]+)"', html) == [
        "/static/taskyard/uplot/uPlot.iife.min.js",
        "/static/taskyard/dashboard.js",
    ]
    assert "<script>" not in html
    # Task names link to their page.
    assert '<a href="/dashboard/tasks/bdc.tasks.send">bdc.tasks.send</a>' in html


def test_a_gap_in_the_series_breaks_the_line() -> None:
    board = render_chart(dashboard.latency_chart(as_data(sample()), "wait"))
    spec = tcharts(board)["Queue wait percentiles"]
    p99 = series_of(spec, "wait p99")
    assert p99.count(None) == 1 and p99[0] is not None  # one None splits the line in two
    # A collection gap of more than three steps breaks the line too.
    line = charts.Line(
        "x", "#000", [(NOW - 100, 1.0), (NOW - 90, 2.0), (NOW - 80, 3.0), (NOW, 4.0)]
    )
    gapped = tcharts(render_chart(charts.time_chart("g", [line], start=NOW - 120, end=NOW)))["g"]
    assert series_of(gapped, "x") == [1.0, 2.0, 3.0, None, 4.0]


def test_worker_bars_show_percent_and_threshold_markers() -> None:
    svg = svg_of(dashboard.worker_bars(as_data(sample())))
    bars = {
        r.get("data-label"): float(r.get("width", 0))
        for r in svg.iter(f"{SVG}rect")
        if r.get("class") == "bar"
    }
    assert set(bars) == {"critical@h memory", "critical@h cpu"}  # a None reading draws no bar
    assert bars["critical@h memory"] > bars["critical@h cpu"] * 7
    assert len([ln for ln in svg.iter(f"{SVG}line")]) == 8  # warning + critical per bar row
    text = " ".join(t.text or "" for t in svg.iter(f"{SVG}text"))
    assert "93.5%" in text and "silent 45 s" in text


def test_queue_now_bars_stack_ready_and_reserved() -> None:
    svg = svg_of(dashboard.queue_now_chart(as_data(sample())))
    labels = [t.text for t in svg.iter(f"{SVG}text")]
    for level in LEVELS:
        assert level in labels
    assert "9 (1 reserved)" in labels
    data = sample()
    data["queues"][0]["oldest_ready_age_s"] = 3.25
    labels = [t.text for t in svg_of(dashboard.queue_now_chart(as_data(data))).iter(f"{SVG}text")]
    assert "5 (1 reserved, oldest 3.25 s)" in labels


def test_empty_store_renders_placeholders_not_errors() -> None:
    data = {
        "now": NOW,
        "window_s": 900.0,
        "thresholds": THRESHOLDS,
        "problems": [],
        "queues": [],
        "workers": [],
        "tasks": [],
        "batches": [],
        "alerts": [],
        "series": {},
    }
    html = dashboard.render_page(as_data(data), refresh_s=0)
    assert "No alert is firing." in html
    assert "no data yet" in html and "no worker heartbeats" in html
    assert "http-equiv" not in html
    assert len(svgs(html)) >= 7


def test_problems_are_listed_on_the_page() -> None:
    data = sample()
    data["problems"] = ["workers: ConnectionError: refused"]
    assert "workers: ConnectionError: refused" in dashboard.render_board(as_data(data))


def test_nice_ceiling_and_format_value() -> None:
    assert [charts.nice_ceiling(v) for v in (0, 0.7, 1, 3, 7, 11, 2600)] == [
        1,
        1,
        1,
        5,
        10,
        20,
        5000,
    ]
    assert charts.format_value(0.0042, "s") == "4.2 ms"
    assert charts.format_value(2.5, "s") == "2.5 s"
    assert charts.format_value(12_345) == "12.3k"
    assert charts.format_value(None) == "-"
    assert [charts.duration(s) for s in (900, 3600, 5400, 86400)] == [
        "15 min",
        "1 h",
        "1 h 30 min",
        "24 h",
    ]
    assert charts.format_value(float("nan"), "%") == "-"


def test_time_chart_clamps_to_the_window_and_scales_to_a_round_maximum() -> None:
    line = charts.Line("x", "#000", [(NOW - 7200, 1e9), (NOW - 60, 30.0), (NOW, 45.0)])
    spec = tcharts(render_chart(charts.time_chart("t", [line], start=NOW - 3600, end=NOW)))["t"]
    assert series_of(spec, "x") == [30.0, 45.0]  # the point outside the window is ignored
    assert spec["x"] == [NOW - 60, NOW] and spec["end"] == NOW


class FakeStore:
    """Answers like StatsStore, from :func:`sample`; ``down`` raises as Redis down would."""

    def __init__(self, down: bool = False) -> None:
        self.data, self.down = sample(), down
        self.series_calls: list[tuple[str, float | None, int]] = []

    def _get(self, key: str) -> Any:
        if self.down:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")
        return self.data[key]

    def queues(self) -> Any:
        return self._get("queues")

    def workers(self) -> Any:
        return self._get("workers")

    def tasks(self) -> Any:
        return self._get("tasks")

    def batches(self) -> Any:
        return self._get("batches")

    def alerts(self, include_resolved: bool = False) -> Any:
        return self._get("alerts")

    def alert_changes(self, limit: int = 100) -> Any:
        return self.data.get("alert_changes", [])[:limit] if not self.down else self._get("-")

    def cache(self) -> Any:
        return self._get("cache")

    def histograms(self) -> Any:
        return {"buckets": [], "runtime": [], "wait": []}

    def maintenance(self) -> Any:
        return []

    def overview(self) -> Any:
        return {}

    def series(
        self, name: str, since: float | None, until: float | None, limit: int, offset: int
    ) -> Any:
        return self._get("series").get(name, [])[offset : offset + limit]

    def sample_series(self, name: str, since: float, until: float, points: int) -> Any:
        self.series_calls.append((name, since, points))
        return self._get("series").get(name, [])

    def covered_since(self) -> float | None:
        snaps = self._get("series").get("queues", [])
        return float(snaps[-1]["at"]) if snaps else None

    def timeline(self, task_id: str) -> Any:
        return self.data.get("timelines", {}).get(task_id)

    def check_ready(self) -> dict[str, str | None]:
        return {"redis": None}


def client_for(store: FakeStore) -> TestClient:
    from types import SimpleNamespace

    import redis

    from taskyard.keys import Keys
    from taskyard.monitoring.api.access import Access
    from taskyard.monitoring.api.audit import AuditLog
    from taskyard.monitoring.api.query import ResponseCache
    from taskyard.monitoring.api.state import ApiState
    from taskyard.monitoring.api.users import UserStore
    from taskyard.monitoring.dashboard.routes import router

    app = FastAPI()
    runtime = SimpleNamespace(settings=load_settings())
    app.state.taskyard = ApiState(
        runtime=runtime,  # type: ignore[arg-type]  # the pages read its settings only
        store=store,  # the in-memory twin satisfies StatsSource
        cache=ResponseCache(0),
        # Never reached: no middleware identifies requests, and these pages act on nothing.
        auth=Access(
            UserStore(redis.Redis(port=1), Keys()),
            AuditLog(redis.Redis(port=1), Keys()),
            admin_token=None,
        ),
        celery_app=None,
    )
    app.add_middleware(SecurityHeaders)
    app.include_router(router)
    return TestClient(app)


def test_route_serves_page_and_fragment_with_bounded_window() -> None:
    store = FakeStore()
    client = client_for(store)
    page = client.get("/dashboard", params={"window": 900})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text.startswith("<!DOCTYPE html>") and "Queue depth per level" in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert {name for name, _, _ in store.series_calls} == set(dashboard.CHART_SERIES)
    # The store is asked for that many snapshots of each series.
    assert {limit for _, _, limit in store.series_calls} == {
        series_charts.CHART_POINTS,
        series_charts.SAMPLED_POINTS,
    }
    fragment = client.get("/dashboard", params={"fragment": "true"})
    assert fragment.status_code == 200 and not fragment.text.startswith("<!DOCTYPE")
    for bad in ({"window": "abc"}, {"window": 5}, {"refresh": -1}):
        assert client.get("/dashboard", params=bad).status_code == 422


def test_route_answers_503_page_when_the_store_is_down() -> None:
    response = client_for(FakeStore(down=True)).get("/dashboard")
    assert response.status_code == 503
    assert "Connection refused" in response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize("refresh", [0, 30])
def test_refresh_setting_reaches_the_script(refresh: int) -> None:
    html = dashboard.render_page(as_data(sample()), refresh_s=refresh)
    assert f'<body data-refresh="{refresh}">' in html


def test_time_chart_zooms_in_on_short_history_but_not_below_the_minimum_span() -> None:
    line = charts.Line("x", "#000", [(NOW - 60, 1.0), (NOW, 2.0)])
    spec = tcharts(render_chart(charts.time_chart("t", [line], start=NOW - 3600, end=NOW)))["t"]
    assert spec["start"] == pytest.approx(NOW - 63)  # 60 s of data plus a 5 % margin
    short = charts.Line("x", "#000", [(NOW - 2, 1.0), (NOW, 2.0)])
    spec = tcharts(render_chart(charts.time_chart("t", [short], start=NOW - 3600, end=NOW)))["t"]
    assert spec["start"] == pytest.approx(NOW - 10.1)


def test_batch_bars_read_the_batching_package_shape() -> None:
    data = sample()
    data["batches"] = [
        # taskyard.batching.inspect_batches: per-name totals plus a list of groups.
        {
            "batch_name": "emails",
            "buffered": 40,
            "oldest_age_s": 1.5,
            "in_flight": 2,
            "in_flight_items": 200,
            "dead": 1,
            "dead_items": 100,
            "groups": [{"group": ""}],
        },
        {"batch_name": "sms", "buffered": 3, "in_flight": 1, "in_flight_items": 1},
    ]
    svg = svg_of(dashboard.batch_chart(as_data(data)))
    text = [t.text for t in svg.iter(f"{SVG}text")]
    assert "emails" in text and "sms" in text
    assert "40 buffered, 200 in flight, 1 dead, oldest 1.5 s" in text
    assert "3 buffered, 1 in flight" in text
    widths = {
        r.get("data-label"): float(r.get("width", 0))
        for r in svg.iter(f"{SVG}rect")
        if r.get("class") == "bar" and "in flight" in (r.findtext(f"{SVG}title") or "")
    }
    assert widths["emails"] > widths["sms"]


def test_gridlines_land_on_round_values() -> None:
    assert [charts.grid_steps(t) for t in (1, 10, 20, 25, 50, 100, 250, 0.5)] == [
        5,
        5,
        4,
        5,
        5,
        5,
        5,
        5,
    ]


def test_a_window_longer_than_the_point_limit_says_what_it_shows() -> None:
    data = sample(points=dashboard.MAX_POINTS)  # 10 s apart: 2 h of snapshots
    data["window_s"] = 6 * 3600.0
    board = dashboard.render_board(as_data(data))
    oldest = NOW - 10 * (dashboard.MAX_POINTS - 1)
    assert f"newest {dashboard.MAX_POINTS} snapshots (since {charts.clock(oldest)} UTC)" in board
    data["window_s"] = 3600.0
    assert "newest" not in dashboard.render_board(as_data(data))


def test_cache_bars_mark_namespaces_below_the_alert_threshold() -> None:
    svg = svg_of(dashboard.cache_chart(as_data(sample())))
    fills = {
        r.get("data-label"): r.get("fill")
        for r in svg.iter(f"{SVG}rect")
        if r.get("class") == "bar"
    }
    assert fills == {"user": "#16a34a", "analytics": "#d97706"}
    text = [t.text for t in svg.iter(f"{SVG}text")]
    assert "25% of 40 lookups" in text
    assert "paused low,batch" in render_chart(dashboard.worker_bars(as_data(sample())))


def test_queue_bars_say_when_reserved_messages_are_not_visible() -> None:
    data = sample()
    data["queues"] = [
        {"queue": lv, "depth": 3, "ready": 3, "reserved": 0, "reserved_known": False}
        for lv in LEVELS
    ]
    labels = [t.text for t in svg_of(dashboard.queue_now_chart(as_data(data))).iter(f"{SVG}text")]
    assert "3 (reserved unknown)" in labels and "3 (0 reserved)" not in labels


def test_sampled_series_spreads_over_the_window_and_keeps_its_picks(
    make_app: Any, tmp_path: Any
) -> None:
    """A sample of a real Redis series plus the history database beyond it; as a snapshot is
    pushed, the older picks stay the same (so a page build parses only new ones)."""
    import json

    from taskyard.monitoring import history
    from taskyard.monitoring.store import StatsStore, sample_indices
    from taskyard.runtime import runtime_of

    app = make_app("sampled", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    store = StatsStore(runtime_of(app))
    client, key = store.redis, store.keys.series("queues")
    for i in range(100):  # newest first, 10 s apart, the newest at NOW
        client.rpush(key, json.dumps({"at": NOW - 10 * i, "n": i}))
    history.ensure_schema(store.engine)
    history.write_snapshots(
        store.engine, [("queues", NOW - 1000 - 10 * i, {"n": 100 + i}) for i in range(60)]
    )
    inside = store.sample_series("queues", NOW - 500, NOW, points=10)
    ats = [s["at"] for s in inside]
    assert ats[0] == NOW and ats == sorted(ats, reverse=True)
    assert 8 <= len(ats) <= 12 and min(ats) >= NOW - 500
    everything = store.sample_series("queues", NOW - 1600, NOW, points=10)
    older = [s for s in everything if s["at"] < NOW - 990]
    assert 3 <= len(older) <= 6 and min(s["at"] for s in older) >= NOW - 1600
    # Anchored at the oldest end: one more snapshot at the head shifts nothing else.
    before = set(sample_indices(100, 100, 10))
    after = {i - 1 for i in sample_indices(101, 100, 10) if i > 0}
    assert len(before & after) >= len(before) - 2


def test_the_store_says_how_far_the_history_reaches(make_app: Any, tmp_path: Any) -> None:
    """covered_since: the oldest overview snapshot in Redis or, older, in the database."""
    import json

    from taskyard.monitoring import history
    from taskyard.monitoring.store import StatsStore
    from taskyard.runtime import runtime_of

    app = make_app("covered", database_url=f"sqlite:///{tmp_path / 'h.db'}")
    store = StatsStore(runtime_of(app))
    assert store.covered_since() is None
    key = store.keys.series("overview")
    for i in range(5):
        store.redis.rpush(key, json.dumps({"at": NOW - 10 * i}))
    assert store.covered_since() == NOW - 40
    history.write_snapshots(store.engine, [("overview", NOW - 900 - i, {}) for i in range(3)])
    assert store.covered_since() == NOW - 902


def test_snapshots_are_validated_once_and_old_shapes_still_draw() -> None:
    from taskyard.monitoring.dashboard.rows import QueuesSnapshot, TasksSnapshot, snapshots

    raw = [{"at": NOW, "tasks": [{"name": "a", "queue": "high", "succeeded": 2}]}]
    first, again = snapshots(TasksSnapshot, raw), snapshots(TasksSnapshot, raw)
    assert first[0] is again[0] and first[0].tasks[0].succeeded == 2
    # An equal but new dict (a history read) is validated anew.
    fresh = snapshots(TasksSnapshot, [dict(raw[0])])
    assert fresh[0] is not first[0] and fresh[0] == first[0]
    # The oldest queue snapshots held the depth alone; a missing level is no point.
    old = snapshots(QueuesSnapshot, [{"at": NOW, "queues": {"high": 7, "low": {"depth": 3}}}])
    assert [old[0].depth(level) for level in ("high", "low", "batch")] == [7.0, 3.0, None]


def test_the_pages_own_window_is_always_offered_and_marked() -> None:
    """With 5 minutes of history and a 1 h page, the header offered only "15 min" while the
    page said "window 1 h"; the page's own window is offered too, marked as chosen."""
    from taskyard.monitoring.dashboard.layout import ranges

    links = ranges({}, 3600, NOW - 300, NOW)
    assert [(link.label, link.on) for link in links] == [("15 min", False), ("1 h", True)]
