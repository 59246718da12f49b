"""The monitoring part of ``taskyard up``: Flower and the stats API (which serves the dashboard).

Both run as supervised children of ``taskyard up`` through the ``taskyard`` command itself, so
they read the same environment (including the embedded Redis URL) as the workers.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Collection

from taskyard.config import ENV_PREFIX, NESTED_DELIMITER, Settings
from taskyard.devstack.supervisor import Service, free_port


def port_or_free(host: str, port: int, taken: Collection[int] = ()) -> int:
    """``port`` when nothing listens on it at ``host`` and it is not one of ``taken`` (the ports
    the stack's other services were given), else some free port that is not one of them.

    A busy configured port (a second stack, another program) must not make the child exit and
    so stop the whole stack.
    """
    if port in taken:
        return free_port(host, taken)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers bind (uvicorn, Flower's tornado): connections the last server on the
        # port closed (TIME_WAIT, e.g. after `taskyard up` checked it was ready) do not make it
        # busy; only a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return free_port(host, taken)
    return port


def _shown(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else host


def monitoring_services(app_path: str, settings: Settings) -> list[Service]:
    """Flower and the stats API for ``taskyard up``; each Service's address is its URL."""
    m = settings.monitoring
    command = [sys.executable, "-m", "taskyard.cli"]
    flower_host = m.flower_host or "127.0.0.1"
    flower_port = port_or_free(flower_host, m.flower_port)
    flower_address = m.flower_url or f"http://{_shown(flower_host)}:{flower_port}/"
    flower = Service(
        "flower",
        [*command, "flower", "-A", app_path, "--port", str(flower_port), "--address", flower_host],
        flower_address,
        ready_url=f"http://{_shown(flower_host)}:{flower_port}/healthcheck",
    )
    api_port = port_or_free(m.api_host, m.api_port, taken=(flower_port,))
    base = f"http://{_shown(m.api_host)}:{api_port}"
    api = Service(
        "stats api",
        [*command, "api", "-A", app_path, "--host", m.api_host, "--port", str(api_port)],
        f"{base}/api/v1/overview  (docs {base}/docs, metrics {base}/metrics)",
        # The dashboard links to Flower's task and worker pages at the port it really got.
        env={f"{ENV_PREFIX}MONITORING{NESTED_DELIMITER}FLOWER_URL": flower_address},
        ready_url=f"{base}/health/live",
    )
    return [flower, api]


def api_base_url(api: Service) -> str:
    """The stats API's base address (``http://host:port``)."""
    return api.address.split("/api/", 1)[0]


def dashboard_url(api: Service) -> str:
    """The dashboard's address, served by the stats API ``api``."""
    return api.address.split("/api/", 1)[0] + "/dashboard"
