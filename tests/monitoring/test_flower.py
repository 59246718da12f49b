"""`taskyard flower`: a real Flower process against real Redis and a real worker."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx
import pytest
import redis

from taskyard.config import load_settings
from taskyard.devstack.supervisor import free_port
from taskyard.monitoring.flower import (
    amqp_queue_rows,
    app_queue_names,
    check_basic_auth,
    credentials_match,
    flower_args,
    flower_url,
    generate_basic_auth,
    merge_queue_names,
)
from taskyard.testing import ROOT, celery_worker, child_env, terminate, wait_until
from tests import servers

LEVELS = ["critical", "high", "normal", "low", "batch"]
APP = "tests.apps.fivelevels"
AUTH = ("watcher", "s3cret-pw")


# --- pure parts ------------------------------------------------------------------------------


def test_app_queue_names_are_the_five_levels_in_order(make_app: Any) -> None:
    assert app_queue_names(make_app("flowerq")) == LEVELS


def test_merge_keeps_declared_order_and_adds_consumed_extras() -> None:
    assert merge_queue_names(LEVELS, ["critical"]) == LEVELS
    assert merge_queue_names(LEVELS, ["zeta", "alpha", "low"]) == [*LEVELS, "alpha", "zeta"]


def test_basic_auth_setting_is_checked() -> None:
    assert check_basic_auth("a:b,c:d") == "a:b,c:d"
    for bad in ("", ",", "nocolon", "user:", ":pw", "a:b,broken"):
        with pytest.raises(click.BadParameter, match="user:password"):
            check_basic_auth(bad)


def test_no_built_in_password_and_generated_ones_are_fresh() -> None:
    assert load_settings().monitoring.flower_basic_auth is None
    first, second = generate_basic_auth(), generate_basic_auth()
    assert first != second
    user, _, password = first.partition(":")
    assert user == "admin" and len(password) >= 20
    assert check_basic_auth(first) == first


def test_credentials_match_only_the_exact_pair() -> None:
    def header(pair: str) -> str:
        return "Basic " + base64.b64encode(pair.encode()).decode()

    allowed = ["u:pw", "v:other"]
    assert credentials_match(header("u:pw"), allowed)
    assert credentials_match(header("v:other"), allowed)
    for given in (
        None,
        "",
        "Basic",
        "Bearer u:pw",
        header("u:pw2"),
        header("u:"),
        "Basic !!!not-base64",
        header("v:pw"),
    ):
        assert not credentials_match(given, allowed), given


def test_flower_args_come_from_settings_and_keep_credentials_out() -> None:
    settings = load_settings(
        monitoring={
            "flower_port": 5601,
            "flower_host": "0.0.0.0",
            "flower_basic_auth": "u:topsecret",
        }
    )
    args = flower_args("bdc", settings, extra=("--persistent=False",))
    assert args[:3] == ["-A", "bdc", "flower"]
    assert "--port=5601" in args and "--address=0.0.0.0" in args
    assert args[-1] == "--persistent=False"
    assert not any("topsecret" in a for a in args)
    assert flower_url(settings) == "http://127.0.0.1:5601/"
    assert "--broker_api=http://h:15672/api/" in flower_args(
        "bdc", settings, broker_api="http://h:15672/api/"
    )


# --- a real Flower -----------------------------------------------------------------------------


class Flower:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def get(self, path: str, auth: tuple[str, str] | None = AUTH, **params: Any) -> httpx.Response:
        return httpx.get(self.url + path, auth=auth, params=params, timeout=10.0)


@contextmanager
def running_flower(
    extra_env: dict[str, str],
    tmp_path: Path,
    *,
    auth: tuple[str, str] | None = AUTH,
    cwd: Path = ROOT,
) -> Iterator[Flower]:
    """`taskyard flower -A APP` in its own process, on a free port, until the block ends.

    ``auth=None`` configures no credentials (Flower generates them)."""
    port = free_port()
    settings = {**extra_env, "TASKYARD_MONITORING__FLOWER_PORT": str(port)}
    if auth is not None:
        settings["TASKYARD_MONITORING__FLOWER_BASIC_AUTH"] = f"{auth[0]}:{auth[1]}"
    env = child_env(settings)
    if auth is None:
        env.pop("TASKYARD_MONITORING__FLOWER_BASIC_AUTH", None)
    log = tmp_path / f"flower-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskyard.cli", "flower", "-A", APP],
            env=env,
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    fl = Flower(process, f"http://127.0.0.1:{port}", log)

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError("flower exited:\n" + log.read_text(errors="replace"))
        try:
            # Every route needs the credentials: a 401 already proves Flower serves.
            return fl.get("/healthcheck", auth=None).status_code == 401
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 30, 0.2, "flower to answer")
        yield fl
    finally:
        terminate(process)
    assert AUTH[1] not in " ".join(process.args)  # type: ignore[arg-type]


#: One path per route of Flower's URL table (flower.urls.handlers), plus tornado's own static
#: routes and a path no route names.
EVERY_ROUTE = [
    "/",
    "/workers",
    "/worker/w1@host",
    "/task/abc",
    "/tasks",
    "/tasks/datatable",
    "/broker",
    "/api/workers",
    "/api/worker/shutdown/w1@host",
    "/api/worker/pool/restart/w1@host",
    "/api/worker/pool/grow/w1@host",
    "/api/worker/pool/shrink/w1@host",
    "/api/worker/pool/autoscale/w1@host",
    "/api/worker/queue/add-consumer/w1@host",
    "/api/worker/queue/cancel-consumer/w1@host",
    "/api/tasks",
    "/api/task/types",
    "/api/queues/length",
    "/api/task/info/abc",
    "/api/task/apply/x.y",
    "/api/task/async-apply/x.y",
    "/api/task/send-task/x.y",
    "/api/task/result/abc",
    "/api/task/abort/abc",
    "/api/task/timeout/x.y",
    "/api/task/rate-limit/x.y",
    "/api/task/revoke/abc",
    "/metrics",
    "/healthcheck",
    "/static/css/flower.css",
    "/favicon.ico",
    "/robots.txt",
    "/login",
    "/logout",
    "/no/such/page",
]


def test_every_route_list_covers_flowers_url_table() -> None:
    """The list above tracks Flower's own table, so a new Flower route cannot slip past."""
    import flower.urls

    def matched(pattern: str) -> bool:
        return any(re.fullmatch(pattern, path) for path in EVERY_ROUTE)

    for entry in flower.urls.handlers:
        pattern = entry.regex.pattern if hasattr(entry, "regex") else entry[0]
        assert matched(pattern.rstrip("$")), pattern


@pytest.mark.slow
def test_flower_refuses_every_route_without_credentials_metrics_included(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    with running_flower(redis_env, tmp_path) as fl:
        for path in EVERY_ROUTE:
            for method in ("GET", "POST"):
                for auth in (None, (AUTH[0], "wrong"), ("other", AUTH[1])):
                    response = httpx.request(method, fl.url + path, auth=auth, timeout=10.0)
                    assert response.status_code == 401, (method, path, auth, response.status_code)
                    assert response.headers.get("WWW-Authenticate", "").startswith("Basic"), (
                        method,
                        path,
                        auth,
                        response.headers,
                    )
        metrics = fl.get("/metrics")
        assert metrics.status_code == 200 and "flower_" in metrics.text
        assert fl.get("/healthcheck").text == "OK"
        assert fl.get("/static/css/flower.css").status_code == 200
        assert fl.get("/api/workers").status_code == 200
        assert fl.get("/").status_code == 200


@pytest.mark.slow
def test_flower_without_credentials_generates_a_password_that_works(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    with running_flower(redis_env, tmp_path, auth=None, cwd=tmp_path) as fl:
        text = fl.log.read_text()
        found = re.search(r"generated user (\S+) password (\S+) ", text)
        assert found, text
        generated = (found.group(1), found.group(2))
        # Printed once, and kept in the stack file of the working directory (owner-only).
        assert text.count(generated[1]) == 1
        stack_file = tmp_path / ".taskyard-stack.json"
        assert stack_file.stat().st_mode & 0o077 == 0
        recorded = json.loads(stack_file.read_text())
        assert recorded["env"]["TASKYARD_MONITORING__FLOWER_BASIC_AUTH"] == ":".join(generated)
        assert recorded["urls"]["flower"].startswith("http://127.0.0.1:")
        for path in ("/", "/metrics", "/api/workers", "/healthcheck"):
            assert fl.get(path, auth=None).status_code == 401, path
            assert fl.get(path, auth=("admin", "taskyard")).status_code == 401, path
            assert fl.get(path, auth=generated).status_code == 200, path


@pytest.fixture
def flower(redis_env: dict[str, str], tmp_path: Path) -> Iterator[Flower]:
    with running_flower(redis_env, tmp_path) as fl:
        yield fl


def _send(app: Any, level: str, i: int) -> None:
    app.send_task(f"{APP}.on_{level}", args=[i], queue=level, routing_key=level)


@pytest.mark.slow
def test_flower_needs_auth_lists_tasks_of_all_five_queues_and_shows_them_in_broker_view(
    flower: Flower,
    make_app: Any,
    redis_env: dict[str, str],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    # Basic auth from settings: refused without or with wrong credentials.
    assert flower.get("/api/tasks", auth=None).status_code == 401
    assert flower.get("/api/tasks", auth=(AUTH[0], "wrong")).status_code == 401
    assert flower.get("/broker", auth=None).status_code == 401
    assert flower.get("/api/tasks").status_code == 200

    producer = make_app("flower-producer")
    # The machine's load is not this test's subject: the guards hold nothing back for it.
    worker_env = {
        **redis_env,
        **{
            f"TASKYARD_GUARD__{name}": "100"
            for name in (
                "CPU_WARNING_PCT",
                "CPU_CRITICAL_PCT",
                "MEMORY_WARNING_PCT",
                "MEMORY_CRITICAL_PCT",
            )
        },
    }

    # Only a critical-only worker runs: Flower itself would list just "critical" (the queues
    # live workers consume); ours lists all five, with the backlog of the unconsumed one.
    with celery_worker(APP, "critical", worker_env, tmp_path, concurrency=1, name="crit"):

        def sees_worker() -> bool:
            workers = flower.get("/api/workers", refresh="1").json()
            return any(name.startswith("crit@") for name in workers)

        wait_until(sees_worker, 30, 0.5, "flower to see the critical worker")
        workers = flower.get("/api/workers").json()
        consumed = {
            q["name"]
            for name, w in workers.items()
            if name.startswith("crit@")
            for q in w.get("active_queues", [])
        }
        assert consumed == {"critical"}
        for i in range(3):
            _send(producer, "low", i)
        lengths = flower.get("/api/queues/length").json()["active_queues"]
        assert [q["name"] for q in lengths] == LEVELS
        assert {q["name"]: q["messages"] for q in lengths}["low"] == 3
        page = flower.get("/broker")
        assert page.status_code == 200
        for level in LEVELS:
            assert f'<tr id="{level}">' in page.text

    # A worker on all five queues drains the backlog and runs two more tasks per level.
    with celery_worker(
        APP, ",".join(LEVELS), worker_env, tmp_path, concurrency=2, name="all"
    ) as worker:
        for level in LEVELS:
            for i in range(2):
                _send(producer, level, 100 + i)

        def succeeded_by_queue() -> dict[str, int]:
            tasks = flower.get("/api/tasks", state="SUCCESS").json()
            counts: dict[str, int] = {}
            for task in tasks.values():
                counts[task["routing_key"]] = counts.get(task["routing_key"], 0) + 1
            return counts

        expected = {"critical": 2, "high": 2, "normal": 2, "low": 5, "batch": 2}
        try:
            wait_until(
                lambda: succeeded_by_queue() == expected,
                40,
                0.5,
                "flower to list the succeeded tasks of all five queues",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nflower lists {succeeded_by_queue()}\nworker log:\n"
                f"{worker.output()[-4000:]}\nflower log:\n"
                f"{flower.log.read_text(errors='replace')[-2000:]}"
            ) from None
        tasks = flower.get("/api/tasks").json()
        assert {t["name"] for t in tasks.values()} == {f"{APP}.on_{lv}" for lv in LEVELS}
        assert all(t["worker"].startswith("all@") for t in tasks.values())
        lengths = flower.get("/api/queues/length").json()["active_queues"]
        assert {q["name"]: q["messages"] for q in lengths} == dict.fromkeys(LEVELS, 0)


@pytest.mark.slow
def test_broker_view_on_rabbitmq_counts_the_five_queues_over_amqp(
    redis_env: dict[str, str], tmp_path: Path
) -> None:
    """Flower reads RabbitMQ queue lengths only from the management API; without it (as here)
    its Broker tab is empty. Ours falls back to AMQP passive declares."""
    servers.require("rabbitmq")
    env = {**redis_env, "TASKYARD_BROKER_URL": servers.RABBITMQ_URL}
    with running_flower(env, tmp_path) as fl:
        assert fl.get("/api/queues/length", auth=None).status_code == 401
        for _ in range(3):  # other clients of the shared broker may move messages meanwhile
            shown = fl.get("/api/queues/length").json()["active_queues"]
            direct = amqp_queue_rows(servers.RABBITMQ_URL, LEVELS)
            if shown == direct:
                break
        assert [q["name"] for q in shown] == LEVELS
        assert shown == direct
        assert all(
            isinstance(q["messages"], int) and isinstance(q["consumers"], int) for q in shown
        )
        page = fl.get("/broker")
        assert page.status_code == 200
        for row in shown:
            assert f'<tr id="{row["name"]}">' in page.text
