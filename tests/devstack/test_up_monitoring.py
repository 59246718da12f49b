"""`taskyard up` also runs Flower and the stats API (with the dashboard) and stops them all."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import psutil
import pytest

from taskyard.config import load_settings
from taskyard.devstack.services import dashboard_url, monitoring_services, port_or_free
from taskyard.devstack.supervisor import free_port, free_ports
from taskyard.testing import start_up, wait_started, wait_until

LEVELS = ["critical", "high", "normal", "low", "batch"]


def test_busy_configured_port_falls_back_to_a_free_one() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        other = port_or_free("127.0.0.1", taken)
        assert other != taken
    free = free_port()
    assert port_or_free("127.0.0.1", free) == free
    # A port another service of the stack was given is not handed out again, configured or not.
    assert port_or_free("127.0.0.1", free, taken=(free,)) != free


def test_free_ports_are_distinct_and_avoid_the_taken() -> None:
    for _ in range(50):
        first, second, third = free_ports(3)
        assert len({first, second, third}) == 3
        assert free_port(taken=(first, second, third)) not in (first, second, third)


def test_flower_and_the_api_never_share_a_port() -> None:
    # The same port configured for both: the API gets another.
    port = free_port()
    settings = load_settings(monitoring={"flower_port": port, "api_port": port})
    flower, api = monitoring_services("examples.bdc", settings)
    assert flower.address == f"http://127.0.0.1:{port}/"
    assert f":{port}/" not in api.address


def test_services_run_the_taskyard_commands_and_name_their_addresses() -> None:
    flower_port, api_port = free_ports(2)
    settings = load_settings(monitoring={"flower_port": flower_port, "api_port": api_port})
    flower, api = monitoring_services("examples.bdc", settings)
    assert flower.argv[1:6] == ["-m", "taskyard.cli", "flower", "-A", "examples.bdc"]
    assert api.argv[1:6] == ["-m", "taskyard.cli", "api", "-A", "examples.bdc"]
    assert flower.address == f"http://127.0.0.1:{settings.monitoring.flower_port}/"
    assert dashboard_url(api) == f"http://127.0.0.1:{settings.monitoring.api_port}/dashboard"
    # The dashboard links to the Flower this stack really started.
    assert api.env == {"TASKYARD_MONITORING__FLOWER_URL": flower.address}


@pytest.mark.slow
@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_up_starts_flower_api_and_dashboard_and_leaves_no_orphans(
    tmp_path: Path, stop_with: signal.Signals
) -> None:
    flower_port, api_port = free_ports(2)
    env = {  # no TASKYARD_REDIS_URL: the stack runs on its embedded Redis
        "TASKYARD_DATABASE_URL": f"sqlite:///{tmp_path / 'up.db'}",
        "TASKYARD_MONITORING__FLOWER_PORT": str(flower_port),
        "TASKYARD_MONITORING__API_PORT": str(api_port),
        "TASKYARD_MONITORING__FLOWER_BASIC_AUTH": "ops:pw-for-test",
    }
    up, log = start_up("tests.apps.fivelevels", tmp_path, env, "--no-beat")
    descendants: list[psutil.Process] = []
    try:
        text = wait_started(up, log, 60)
        flower_url = f"http://127.0.0.1:{flower_port}/"
        api_url = f"http://127.0.0.1:{api_port}"
        assert re.search(rf"^flower\s+\d+\s+{re.escape(flower_url)}", text, re.M), text
        assert re.search(rf"^stats api\s+\d+\s+{re.escape(api_url)}/api/v1/overview", text, re.M), (
            text
        )
        assert re.search(rf"^dashboard\s+\d+\s+{re.escape(api_url)}/dashboard", text, re.M), text
        assert "pw-for-test" not in text

        def answers(url: str, **kw: object) -> bool:
            try:
                return httpx.get(url, timeout=3, **kw).status_code == 200  # type: ignore[arg-type]
            except httpx.HTTPError:
                return False

        wait_until(lambda: answers(api_url + "/health/live"), 60, 0.3, "the stats API")
        wait_until(
            lambda: answers(flower_url + "healthcheck", auth=("ops", "pw-for-test")),
            60,
            0.3,
            "Flower",
        )
        page = httpx.get(api_url + "/dashboard", timeout=10)
        assert page.status_code == 200 and "<svg" in page.text
        for level in LEVELS:
            assert f">{level}<" in page.text
        assert httpx.get(flower_url + "api/workers", timeout=10).status_code == 401
        queues = httpx.get(
            flower_url + "api/queues/length", auth=("ops", "pw-for-test"), timeout=10
        ).json()["active_queues"]
        assert [q["name"] for q in queues] == LEVELS
        descendants = psutil.Process(up.pid).children(recursive=True)
        assert len(descendants) >= 6  # redis, 3 workers (+ pools), flower, api
    finally:
        if up.poll() is None:
            up.send_signal(stop_with)
        try:
            code = up.wait(40)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, log.read_text(errors="replace")[-3000:]
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, [p.pid for p in alive]
    for port in (flower_port, api_port):
        assert port_or_free("127.0.0.1", port) == port, f"port {port} still bound"
