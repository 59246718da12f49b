"""Every dashboard page rendered from sample data whose task- and worker-written fields are hostile
text: markup, quotes, template syntax and control characters come out as text, never as markup;
and no module of the dashboard builds markup in Python."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import taskyard.monitoring.dashboard as dashboard_package
from taskyard.deadletters import DeadLetter
from taskyard.monitoring.api import models as m
from taskyard.monitoring.dashboard import dead, overview, task, task_name, tasks, workers
from taskyard.monitoring.dashboard.charts import Line, time_chart
from taskyard.monitoring.dashboard.layout import Shell, Window, shell
from taskyard.monitoring.dashboard.rows import (
    TasksSnapshot,
    Thresholds,
    WorkersSnapshot,
    series_of,
    typed,
)
from taskyard.monitoring.dashboard.series_charts import task_rate_chart, worker_chart
from taskyard.monitoring.dashboard.templating import render
from tests.monitoring.dashboard.test_pages import NOW

#: What a task, a worker or a producer may write: markup, attribute breakouts, template syntax,
#: a closing script tag (inside the charts' JSON), terminal escapes, a bare CR, BEL, C1.
HOSTILE = (
    "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>{{ 7*7 }}{% if %}\x1b[2J\r\x07\x9b"
)
#: Each must never appear in a page as is.
RAW = ("<script>alert", "<img", "onerror=alert(2)>", "\x1b", "\r", "\x07", "\x9b", '</script>"')
FLOWER = "http://flower.example/"


def name(kind: str) -> str:
    """A hostile value that says which field it is in."""
    return f"{kind}{HOSTILE}"


def page_shell(title: str) -> Shell:
    return shell(
        title,
        request=None,
        active="/dashboard",
        settings=None,
        refresh_s=5,
        window=Window(3600.0, NOW, NOW - 7200, {"q": HOSTILE}),
        note=HOSTILE,
    )


def assert_escaped(html: str, fields: list[str]) -> None:
    """No hostile piece as is; each field's name present as escaped text."""
    for raw in RAW:
        assert raw not in html, (raw, html[max(0, html.find(raw) - 200) : html.find(raw) + 200])
    for field in fields:
        assert f"{field}&lt;script&gt;alert(1)&lt;/script&gt;" in html, field
    # Template syntax in data stays text: nothing evaluates it.
    assert "{{ 7*7 }}" in html
    assert "\\x1b[2J\\x0d\\x07\\x9b" in html  # control characters shown, not sent
    # Every SVG is well-formed XML (a control character would break it).
    for svg in re.findall(r"<svg\b.*?</svg>", html, flags=re.S):
        ET.fromstring(svg)


def hostile_worker(kind: str) -> dict[str, Any]:
    return {
        "hostname": name(kind),
        "host": name(kind + "-host"),
        "alive": True,
        "age_s": 1.0,
        "memory_pct": 50.0,
        "cpu_pct": 10.0,
        "state": name(kind + "-state"),
        "paused_queues": [name(kind + "-queue")],
    }


def task_row(task: str) -> dict[str, Any]:
    return {"name": task, "queue": name("queue"), "succeeded": 3, "failed": 1, "runtime_p95": 0.1}


def snapshots() -> dict[str, list[dict[str, Any]]]:
    """Series snapshots naming the same hostile task, worker and batch."""
    return {
        "tasks": [
            {"at": NOW - 10 * i, "tasks": [{**task_row(name("task")), "succeeded": 30 - i}]}
            for i in range(5)
        ],
        "workers": [{"at": NOW - 10 * i, "workers": [hostile_worker("worker")]} for i in range(5)],
        "batches": [
            {"at": NOW - 10 * i, "batches": [{"batch_name": name("batch"), "buffered": i}]}
            for i in range(5)
        ],
    }


def dead_letter() -> DeadLetter:
    return DeadLetter(
        id=name("id"),
        reason="failed",
        name=name("task"),
        queue=name("queue"),
        args='["' + HOSTILE.replace("\\", "\\\\").replace('"', '\\"') + '"]',
        kwargs="{}",
        exception_type=name("exctype"),
        exception=name("exception"),
        traceback="Traceback (most recent call last):\n  " + name("traceback"),
        worker=name("deadworker"),
        last_at=NOW,
        detail=name("detail"),
    )


def test_overview_escapes_every_written_field() -> None:
    data = overview.OverviewData(
        now=NOW,
        window_s=3600.0,
        thresholds=Thresholds(),
        problems=[name("problem")],
        queues=[m.QueueStats(queue=name("level"), depth=1, ready=1, reserved=0)],
        workers=[m.WorkerStats.model_validate(hostile_worker("worker"))],
        tasks=[m.TaskStats.model_validate(task_row(name("task")))],
        batches=[m.BatchStats(batch_name=name("batch"), buffered=3, in_flight_items=1)],
        alerts=[
            m.Alert(
                id="a",
                alertname=name("alertname"),
                severity="critical",
                state="firing",
                since=NOW - 5,
                summary=name("summary"),
            )
        ],
        alert_changes=[
            m.AlertChange(
                at=NOW,
                id="a",
                alertname=name("changename"),
                state="resolved",
                severity="warning",
                since=NOW - 60,
                summary=name("changesummary"),
            )
        ],
        cache=[m.CacheStats(namespace=name("namespace"), hits=1, misses=1, hit_rate_pct=50.0)],
        series=series_of(snapshots()),
        covered_since=NOW - 7200,
    )
    html = overview.render_page(data, refresh_s=5)
    assert_escaped(
        html,
        [
            "problem",
            "level",
            "worker",
            "worker-state",
            "worker-queue",
            "task",
            "queue",
            "batch",
            "alertname",
            "summary",
            "changename",
            "changesummary",
            "namespace",
        ],
    )
    # The task name links to its page, quoted as one path segment.
    assert 'href="/dashboard/tasks/task%3Cscript%3Ealert%281%29%3C%2Fscript%3E%22%27%3E' in html
    # The charts' JSON cannot close its script element.
    for raw in re.findall(r'<script type="application/json">(.*?)</script>', html, flags=re.S):
        assert "<" not in raw and ">" not in raw
    assert overview.render_board(data).count("<html") == 0


def test_workers_page_escapes_worker_fields() -> None:
    view = workers.WorkersView(
        FLOWER,
        [m.WorkerStats.model_validate(hostile_worker("worker"))],
        [
            (
                name("heading"),
                worker_chart(
                    name("chart"),
                    typed(WorkersSnapshot, snapshots()["workers"]),
                    "memory",
                    start=NOW - 60,
                    end=NOW,
                ),
            )
        ],
    )
    html = workers.render_workers(view, page_shell("workers"))
    assert_escaped(html, ["worker", "worker-host", "worker-state", "worker-queue", "heading"])
    assert 'href="http://flower.example/worker/worker%3Cscript%3E' in html
    assert html.startswith("<!DOCTYPE html>")
    board = workers.render_workers(view, Shell("workers", fragment=True))
    assert "<header>" not in board and 'id="workers"' in board


def test_tasks_page_escapes_task_names() -> None:
    snaps = typed(TasksSnapshot, snapshots()["tasks"])
    chart = task_rate_chart("rate", snaps, "succeeded", start=NOW - 60, end=NOW)
    names = tasks.per_name([m.TaskStats.model_validate(task_row(name("task")))])
    html = tasks.render_tasks(tasks.TasksView(names, chart, chart), page_shell("tasks"))
    assert_escaped(html, ["task", "queue"])
    assert name("task").replace("<", "&lt;")[:20] in chart.hover.replace("<", "&lt;")


def test_task_name_page_escapes_the_name_and_its_failures() -> None:
    runtime = time_chart(
        name("runtime"), [Line(name("line"), "#000", [(NOW, 1.0)])], start=NOW - 60, end=NOW
    )
    view = task_name.TaskNameView(
        name=name("task"),
        flower=FLOWER,
        charts=[runtime],
        runtime=runtime,
        counters=[m.TaskStats.model_validate(task_row(name("task")))],
        failures=[dead_letter()],
    )
    html = task_name.render_task_name(view, page_shell(name("title")))
    assert_escaped(html, ["task", "queue", "id", "exctype", "exception", "traceback", "title"])
    # A problem reading the dead letters is shown as text too.
    empty = task_name.TaskNameView(name("task"), FLOWER, [], runtime, [], [], name("problem"))
    assert_escaped(task_name.render_task_name(empty, page_shell("t")), ["task", "problem"])


def test_task_page_escapes_timeline_arguments_and_traceback() -> None:
    timeline = m.TaskTimeline(
        task_id=name("id"),
        name=name("task"),
        queue=name("queue"),
        state=name("state"),
        first_at=NOW - 5,
        last_at=NOW,
        events=[
            m.TimelineEvent(
                at=NOW, event=name("event"), worker=name("worker"), detail=name("detail")
            )
        ],
    )
    view = task.TaskView(name("id"), FLOWER, timeline, dead_letter(), result_note=name("note"))
    html = task.render_task(view, page_shell(name("title")))
    assert_escaped(html, ["id", "task", "queue", "state", "event", "worker", "detail", "exctype"])
    assert_escaped(html, ["exception", "traceback", "title"])
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.split('id="traceback"')[1]
    # The arguments (JSON text a producer wrote) are shown as text.
    args = html.split("<dt>args</dt>")[1].split("</dd>")[0]
    assert "&lt;script&gt;" in args and "<script" not in args
    # Unknown task: its id and the lookup's problem are text.
    missing = task.TaskView(name("id"), FLOWER, None, None, problem=name("problem"))
    assert_escaped(task.render_task(missing, page_shell("t")), ["id", "problem"])
    # Known, not dead: the result note.
    alive = task.TaskView(name("id"), FLOWER, timeline, None, result_note=name("note"))
    assert_escaped(task.render_task(alive, page_shell("t")), ["note", "event"])


def test_task_page_offers_cancel_to_operators_while_the_task_is_not_done() -> None:
    operator = task.CancelControls(csrf=name("csrf"), can_cancel=True)

    def view(state: str, controls: task.CancelControls, dead: bool = False) -> task.TaskView:
        timeline = m.TaskTimeline(
            task_id=name("id"), name=name("task"), state=state, events=[], first_at=NOW
        )
        return task.TaskView(
            name("id"), FLOWER, timeline, dead_letter() if dead else None, controls=controls
        )

    html = task.render_task(view("started", operator), page_shell("t"))
    assert 'id="cancel-task"' in html and 'name="terminate" value="yes"' in html
    assert 'action="/dashboard/task/id%3Cscript%3Ealert%281%29' in html
    assert_escaped(html, ["id", "task", "csrf"])
    for state in ("sent", "received", "retried", "deferred"):
        assert 'id="cancel-task"' in task.render_task(view(state, operator), page_shell("t"))
    for state in task.FINISHED:
        assert 'id="cancel-task"' not in task.render_task(view(state, operator), page_shell("t"))
    assert 'id="cancel-task"' not in task.render_task(view("sent", operator, True), page_shell("t"))
    viewer = task.CancelControls(csrf="token", can_cancel=False)
    assert 'id="cancel-task"' not in task.render_task(view("sent", viewer), page_shell("t"))
    assert "csrf_token" not in task.render_task(
        view("sent", task.CancelControls()), page_shell("t")
    )
    # Unknown: it may wait in a queue, so it may be cancelled.
    unknown = task.TaskView(name("id"), FLOWER, None, None, controls=operator)
    assert 'id="cancel-task"' in task.render_task(unknown, page_shell("t"))


def test_tasks_page_forms_and_hostile_filter_values() -> None:
    snaps = typed(TasksSnapshot, snapshots()["tasks"])
    chart = task_rate_chart("rate", snaps, "succeeded", start=NOW - 60, end=NOW)
    names = tasks.per_name([m.TaskStats.model_validate(task_row(name("task")))])
    operator = task.CancelControls(csrf="token", can_cancel=True)
    where = tasks.TasksFilter(name("name"), name("queue"))
    view = tasks.TasksView(names, chart, chart, where, operator, name("done"), name("problem"))
    html = tasks.render_tasks(view, page_shell("tasks"))
    assert_escaped(html, ["task", "name", "queue", "done", "problem"])
    assert 'id="search"' in html and 'id="filter"' in html and 'id="cancel-waiting"' in html
    viewer = tasks.TasksView(names, chart, chart, controls=task.CancelControls("t", False))
    html = tasks.render_tasks(viewer, page_shell("tasks"))
    assert 'id="search"' in html and 'id="cancel-waiting"' not in html
    assert "csrf_token" not in html


def test_the_cancel_confirm_page_escapes_the_filter_and_the_matches() -> None:
    where = tasks.CancelFilter(name("glob"), name("queue"), "60")
    found = [{"task_id": name("id"), "name": name("task"), "queue": name("q"), "where": "queued"}]
    html = render(
        "tasks_confirm.html",
        shell=page_shell("cancel"),
        where=where,
        csrf="token",
        count=30,
        found=found,
        problem="",
    )
    assert_escaped(html, ["glob", "queue", "id", "task", "q"])
    assert "Cancel 30 waiting task(s)?" in html and "and 29 more" in html
    assert 'id="confirm"' in html and 'name="older_than_s" value="60"' in html
    refused = render(
        "tasks_confirm.html",
        shell=page_shell("cancel"),
        where=where,
        csrf="token",
        count=0,
        found=[],
        problem=name("problem"),
    )
    assert_escaped(refused, ["problem"])
    assert 'id="confirm"' not in refused


def test_dead_page_escapes_entries_counts_and_batches() -> None:
    view = dead.DeadView(
        counts=[dead.DeadCount(name("queue"), name("task"), "failed", 2)],
        entries=[dead_letter()],
        batches=[dead.DeadBatch(name("batch"), "failed", 3, 1, name("error"))],
    )
    html = dead.render_dead(view, page_shell("dead letters"))
    assert_escaped(html, ["queue", "task", "id", "exctype", "exception", "batch", "error"])
    assert "2 dead tasks, 1 dead batches" in html


def test_the_shell_escapes_its_texts_and_query_parameters() -> None:
    html = dead.render_dead(dead.DeadView([], [], []), page_shell(name("title")))
    assert_escaped(html, ["title"])
    # The range links keep the page's other parameters, URL-encoded.
    assert "q=%3Cscript%3Ealert%281%29" in html and "window=900" in html


def _dashboard_modules() -> list[Path]:
    return sorted(Path(dashboard_package.__file__).parent.glob("*.py"))


def markup_in(source: str, where: str = "") -> list[str]:
    """Places in ``source`` that build markup: an f-string or string literal holding a tag (a
    docstring naming an element in ``code`` aside), or a call of escape() or Markup()."""
    offenders = []
    tree = ast.parse(source)
    # The literal parts of an f-string are judged with the f-string.
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if id(node) in parts:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
            if re.search(r"<\s*/?\s*[a-zA-Z!]", text):
                offenders.append(f"{where}:{node.lineno} f-string markup")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.search(r"<(/?[a-zA-Z]+[ >/]|!DOCTYPE)", node.value) and "``" not in node.value:
                offenders.append(f"{where}:{node.lineno} markup literal")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("escape", "Markup"):
                offenders.append(f"{where}:{node.lineno} {called}()")
    return offenders


def test_no_dashboard_module_builds_markup_in_python() -> None:
    """Markup lives in templates/: no module of the dashboard makes any."""
    modules = _dashboard_modules()
    assert {p.name for p in modules} >= {"overview.py", "workers.py", "dead.py", "charts.py"}
    offenders = [o for path in modules for o in markup_in(path.read_text(), path.name)]
    assert not offenders, offenders


def test_the_markup_check_finds_what_it_looks_for() -> None:
    assert markup_in('x = 1\ny = f"<td>{x}</td>"\n') == [":2 f-string markup"]
    assert markup_in('y = "<b>bold</b>"\n') == [":1 markup literal"]
    assert markup_in("from html import escape\ny = escape('a')\n") == [":2 escape()"]
    assert markup_in('def f() -> None:\n    """Draws a ``<figure>``."""\n') == []
