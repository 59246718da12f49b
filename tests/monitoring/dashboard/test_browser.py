"""The dashboard in headless Chromium: a real worker, real stats collection, a real uvicorn.

Needs /usr/bin/chromium (scripts/ensure-browser.sh installs it; `make test` runs that first).
Screenshots of every page are kept in test-artifacts/ (dashboard*.png).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.runtime import runtime_of
from taskyard.testing import ROOT, celery_worker, wait_until
from tests import servers

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
LEVELS = ["critical", "high", "normal", "low", "batch"]
APP = "tests.apps.fivelevels"
#: Chromium with nothing that reaches out: the page must work offline.
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: A queue deeper than this fires QueueDepthHigh in this test (the default is 1000).
DEPTH_LIMIT = 5

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def require_browser() -> None:
    if os.access(CHROMIUM, os.X_OK):
        return
    reason = f"{CHROMIUM} is missing (run scripts/ensure-browser.sh)"
    if servers.in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def env(redis_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {
        **redis_env,
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'history.db'}",
        "TASKYARD_MONITORING__ALERT_QUEUE_DEPTH": str(DEPTH_LIMIT),
        "TASKYARD_MONITORING__FLUSH_INTERVAL_S": "0.2",
        # Pages are reused for half the stats interval: 1 s here, so the refresh shows news.
        "TASKYARD_MONITORING__STATS_INTERVAL_S": "2",
        "TASKYARD_GUARD__HEARTBEAT_INTERVAL_S": "1",
        # The machine's load is not this test's subject: no task is held back for it.
        "TASKYARD_GUARD__CPU_WARNING_PCT": "100",
        "TASKYARD_GUARD__CPU_CRITICAL_PCT": "100",
        "TASKYARD_GUARD__MEMORY_WARNING_PCT": "100",
        "TASKYARD_GUARD__MEMORY_CRITICAL_PCT": "100",
    }


@pytest.fixture
def api_url(env: dict[str, str], taskyard_api: Callable[[dict[str, str]], str]) -> str:
    """`taskyard api` in its own process (uvicorn), on a free port."""
    return taskyard_api(env)


def _send(app: Any, level: str, i: int, name: str | None = None) -> None:
    task = name or f"{APP}.on_{level}"
    app.send_task(task, args=[i], queue=level, routing_key=level)


def test_dashboard_in_chromium_shows_charts_queues_and_a_firing_alert(
    make_app: Any,
    env: dict[str, str],
    api_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    require_browser()
    from playwright.sync_api import sync_playwright

    from taskyard import batch_task
    from taskyard.cache.core import Cache
    from taskyard.monitoring.collect import collect
    from taskyard.monitoring.store import StatsStore

    app = make_app(
        "dash",
        database_url=env["TASKYARD_DATABASE_URL"],
        monitoring={"alert_queue_depth": DEPTH_LIMIT, "alert_timing": {}},
    )
    runtime = runtime_of(app)
    store = StatsStore(runtime)

    # Real cache lookups: 4 keys read 3 times each, so 4 misses and 8 hits.
    cache = Cache(runtime)
    for i in range(12):
        cache.get_or_compute("profiles", f"user-{i % 4}", lambda: {"name": "x"})
    cache.flush_stats()

    # Items that wait in a batch buffer for the whole test (neither size nor age is reached).
    @batch_task(batch_name="dash_emails", batch_size=1000, max_wait=600.0)
    def dash_emails(items: list[Any]) -> None:  # pragma: no cover - never flushed here
        pass

    # A worker on four levels; batch work piles up (no consumer) and fires QueueDepthHigh.
    with celery_worker(APP, "critical,high,normal,low", env, tmp_path, name="dash") as worker:
        finished = 0
        for round_ in range(4):
            for level in LEVELS:
                for i in range(3):
                    _send(app, level, 10 * round_ + i)
            app.send_task(f"{APP}.fails", args=[round_], queue="normal", routing_key="normal")
            dash_emails.add_many([{"user": 10 * round_ + i} for i in range(5 + round_)])
            finished += 4 * 3 + 1

            def done(expected: int = finished) -> bool:
                rows = store.tasks()
                return sum(int(r["succeeded"]) + int(r["failed"]) for r in rows) >= expected

            try:
                wait_until(done, 30, 0.1, f"{finished} tasks to be counted")
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\ncounted: {store.tasks()}\nqueues: {store.queues()}"
                    f"\nworker log:\n{worker.output()[-4000:]}"
                ) from None
            wait_until(lambda: bool(store.workers()), 15, 0.1, "a worker heartbeat")
            collect(runtime)
        firing = [a["alertname"] for a in store.alerts()]
        assert "QueueDepthHigh" in firing

        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                requested: list[str] = []
                page.on("request", lambda request: requested.append(request.url))
                response = page.goto(f"{api_url}/dashboard?window=60&refresh=1")
                assert response is not None and response.status == 200
                page.wait_for_selector("svg.chart")
                check_page(page)
                check_hover(page, "Queue depth per level (messages)", "batch")
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # The inline refresh swaps in new data without a reload: more batch backlog.
                before = page.inner_text(".kpi:first-child b")
                for i in range(4):
                    _send(app, "batch", 100 + i)
                collect(runtime)
                page.wait_for_function(
                    "b => document.querySelector('.kpi:first-child b').textContent !== b",
                    arg=before,
                    timeout=10_000,
                )
                assert int(page.inner_text(".kpi:first-child b")) == int(before) + 4
                check_page(page)
                # Offline: every request the page made went to the API itself.
                assert requested and all(u.startswith(api_url + "/") for u in requested), requested
                check_other_pages(page, api_url)
                elsewhere = [u for u in requested if not u.startswith(api_url + "/")]
                assert not elsewhere, elsewhere
            finally:
                browser.close()


def chart_series(page: Any, title: str) -> list[str]:
    """Labels of the lines uPlot drew in the time chart ``title`` (its legend)."""
    selector = f"figure.tchart[aria-label='{title}']"
    page.wait_for_selector(f"{selector} .u-legend", timeout=10_000)
    labels: list[str] = page.eval_on_selector_all(
        f"{selector} .u-legend .u-series .u-label", "els => els.map(e => e.textContent)"
    )
    return labels[1:]  # the first is the time axis


def check_hover(page: Any, title: str, label: str) -> None:
    """Hovering a chart shows each line's value at that time in its legend."""
    selector = f"figure.tchart[aria-label='{title}']"
    box = page.locator(f"{selector} .u-over").bounding_box()
    assert box is not None, title
    page.mouse.move(box["x"] + box["width"] * 0.97, box["y"] + box["height"] / 2)
    # Condition and reading in one script run: the board's refresh (every second here) may
    # swap the chart for a fresh one between two separate calls.
    handle = page.wait_for_function(
        """([sel, label]) => {
             const rows = [...document.querySelectorAll(sel + ' .u-legend .u-series')].map(
               r => [r.querySelector('.u-label')?.textContent,
                     r.querySelector('.u-value')?.textContent]);
             return rows.some(([l, v]) => l === label && v !== '-' && v !== '--') ? rows : null;
           }""",
        arg=[selector, label],
        timeout=5_000,
    )
    hovered = handle.json_value()
    assert hovered[0][1].endswith("UTC"), hovered  # the time under the cursor
    title_text = page.get_attribute(selector, "title") or ""
    assert title_text.startswith(f"{title} (latest)") and label in title_text


def check_page(page: Any) -> None:
    bars = page.eval_on_selector_all("svg.chart > title", "els => els.map(e => e.textContent)")
    for title in (
        "Batch buffers now (items)",
        "Worker resources (percent of limit)",
        "Queue depth now: ready and reserved",
    ):
        assert title in bars, bars
    for title in (
        "Queue depth per level (messages)",
        "Throughput (tasks per second)",
        "Run time percentiles",
        "Queue wait percentiles",
    ):
        page.wait_for_selector(f"figure.tchart[aria-label='{title}'] canvas", timeout=10_000)
    assert chart_series(page, "Queue depth per level (messages)") == LEVELS
    # Every bar has a hover title with its value.
    bar_titles = page.eval_on_selector_all(
        "svg.chart rect.bar > title", "els => els.map(e => e.textContent)"
    )
    assert bar_titles and all(":" in t for t in bar_titles), bar_titles
    queue_bars = page.eval_on_selector_all(
        "svg[aria-label='Queue depth now: ready and reserved'] rect.bar",
        "els => els.map(e => e.dataset.label)",
    )
    assert "batch" in queue_bars
    text = page.inner_text("main")
    for level in LEVELS:
        assert level in text
    alert = page.inner_text("ul.alerts")
    assert "QueueDepthHigh" in alert and "queue batch holds" in alert
    for chart in ("Throughput (tasks per second)", "Run time percentiles"):
        assert chart_series(page, chart), chart
    # Per worker, and per task name (the failing task's line is in the failures chart).
    assert any(
        label.startswith("dash@")
        for label in chart_series(page, "Memory per worker (percent of limit)")
    )
    assert f"{APP}.fails" in chart_series(page, "Failed per task (per second)")
    assert f"{APP}.on_normal" in chart_series(page, "Succeeded per task (per second)")
    workers = page.eval_on_selector_all(
        "svg[aria-label='Worker resources (percent of limit)'] rect.bar", "e => e.length"
    )
    assert workers >= 1
    assert page.locator(f"table.tasks a:text('{APP}.on_normal')").count() == 1
    batches = page.text_content("svg[aria-label='Batch buffers now (items)']") or ""
    assert "dash_emails" in batches and "26 buffered" in batches  # 5 + 6 + 7 + 8 items
    assert chart_series(page, "Buffered batch items over time") == ["dash_emails"]
    cache = page.text_content("svg[aria-label='Cache hit rate (percent)']") or ""
    assert "profiles" in cache and "66.7% of 12 lookups" in cache
    nav = page.eval_on_selector_all("header nav a", "els => els.map(e => e.textContent)")
    assert nav[:3] == ["Overview", "Workers", "Tasks"] and "Flower" in nav


def check_other_pages(page: Any, api_url: str) -> None:
    """Workers, task names, the failing task's page and one of its tasks."""
    page.click("header nav a:text('Workers')")
    page.wait_for_selector(
        "figure.tchart[aria-label='Memory per worker (percent of limit)'] canvas", timeout=10_000
    )
    assert (
        any(
            label.startswith("dash@")
            for label in chart_series(page, "CPU per host (highest of its workers, percent)")
        )
        is False
    )  # per host: the host name, not the worker's
    assert chart_series(page, "Memory per host (highest of its workers, percent)")
    flower = page.get_attribute("#workers a", "href") or ""
    assert "/worker/dash%40" in flower, flower
    check_hover(
        page,
        "Memory per worker (percent of limit)",
        chart_series(page, "Memory per worker (percent of limit)")[0],
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard-workers.png"), full_page=True)

    page.click("header nav a:text('Tasks')")
    page.wait_for_selector("#task-names")
    page.click(f"#task-names a:text('{APP}.fails')")
    page.wait_for_selector("#task-name")
    assert page.inner_text("#task-name") == f"{APP}.fails"
    assert chart_series(page, f"{APP}.fails: failed per second") == [f"{APP}.fails"]
    failures = page.inner_text("#failures")
    assert "ValueError" in failures and "fails on purpose" in failures, failures
    page.screenshot(path=str(ARTIFACTS / "dashboard-task-name.png"), full_page=True)

    page.click("#failures tbody tr:first-child td:nth-child(2) a")
    page.wait_for_selector("#task-id")
    assert page.inner_text("#task-state") == "dead"
    assert "ValueError: task" in page.inner_text("#traceback")
    timeline = page.inner_text("#timeline")
    assert "started" in timeline and "dead" in timeline, timeline
    in_flower = page.get_attribute("a:text('this task in Flower')", "href") or ""
    assert "/task/" in in_flower
    page.screenshot(path=str(ARTIFACTS / "dashboard-task.png"), full_page=True)

    page.click("header nav a:text('Dead letters')")
    page.wait_for_load_state()
    assert f"{APP}.fails" in page.inner_text("main")
    page.screenshot(path=str(ARTIFACTS / "dashboard-dead.png"), full_page=True)
