"""Stats API and dashboard under load: 50 concurrent keep-alive connections on one uvicorn worker.

``taskyard api`` runs as a real process (one uvicorn worker) over Redis DB 12 holding a
realistic state (20 task names x 5 queues with histograms, 4 workers, alerts, queued messages).
A load generator in a separate process (asyncio, raw HTTP/1.1 keep-alive, so the client costs
little CPU) drives ``/api/v1/overview`` and ``/metrics`` for ``DURATION_S`` each and reports
p50/p99 latency and requests/s. Goals: p99 <= 50 ms and >= 500 requests/s each.

Plain Celery has no stats API; its nearest equivalent is Flower's ``/metrics``, served from the
same machine over the same broker and loaded the same way (the "celery" column of the /metrics
rows). The overview rows have no plain-Celery figure.

The dashboard rows load ``/dashboard`` (the overview page) and ``/metrics`` beside Flower's
main page (``/``, its workers page) and Flower's ``/metrics``, in alternating rounds, while a
real ``celery worker`` (with events, so Flower has live work to show) runs a steady stream of
no-op tasks on the same Redis. Each row also reports the server's CPU time per request
(user + sys of its process). Goals: p99 <= 50 ms and ahead of Flower on both.

``python -m benchmarks.bench_api --load HOST PORT PATH SECONDS CONNECTIONS`` is the load
generator's own entry point (it prints one JSON line).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from benchmarks.common import BENCH_REDIS_URL, Result, percentile
from taskyard.devstack.supervisor import free_port
from taskyard.testing import tree_cpu_s

CONNECTIONS = 50
DURATION_S = 10.0
QUICK_DURATION_S = 3.0
#: Dashboard-vs-Flower rounds (alternating targets) and seconds per target and round.
PAGE_ROUNDS, QUICK_PAGE_ROUNDS = 3, 1
PAGE_SECONDS, QUICK_PAGE_SECONDS = 5.0, 2.0
#: Tasks per second the producer sends to the running worker during the page rounds.
WORKLOAD_PER_S = 100.0
ROOT = Path(__file__).resolve().parent.parent


# --- load generator (runs in its own process) -----------------------------------------------
async def _response(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 response (Content-Length or chunked); returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(length)
    return head[9:12]


async def _connection(
    host: str,
    port: int,
    path: str,
    deadline: float,
    latencies: list[float],
    errors: list[str],
    auth: str = "",
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    credentials = f"Authorization: {auth}\r\n" if auth else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: gzip\r\n{credentials}\r\n"
    ).encode()
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            try:
                status = await asyncio.wait_for(_response(reader), timeout=10.0)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                errors.append(type(exc).__name__)
                return
            latencies.append(time.perf_counter() - started)
            if status != b"200":
                errors.append(status.decode())
    finally:
        writer.close()


async def _load(
    host: str, port: int, path: str, seconds: float, connections: int, auth: str = ""
) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(
        *(
            _connection(host, port, path, deadline, latencies, errors, auth)
            for _ in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "errors": len(errors),
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def _load_main(argv: list[str]) -> None:
    host, port, path, seconds, connections = argv[:5]
    # The Authorization header comes through the environment, never the process list.
    auth = os.environ.get("BENCH_API_AUTH", "")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    figures = asyncio.run(_load(host, int(port), path, float(seconds), int(connections), auth))
    print(json.dumps(figures))


def load(port: int, path: str, seconds: float, auth: str = "") -> dict[str, Any]:
    """Run the load generator in a separate process against 127.0.0.1:port, sending ``auth``
    as the Authorization header of every request (none when empty)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_api",
            "--load",
            "127.0.0.1",
            str(port),
            path,
            str(seconds),
            str(CONNECTIONS),
        ],
        cwd=ROOT,
        env={**os.environ, "BENCH_API_AUTH": auth},
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- servers ------------------------------------------------------------------------------
def _wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        pass


def _seed(url: str, database_url: str) -> None:
    """A realistic state: task counters and histograms, workers, alerts, queued messages."""
    from taskyard.config import load_settings
    from taskyard.keys import Keys
    from taskyard.monitoring.api.app import _resolve
    from taskyard.monitoring.capture import Capture

    settings = load_settings(redis_url=url, database_url=database_url)
    runtime, _app = _resolve(settings)
    capture = Capture(runtime)
    for t in range(20):
        for queue in ("critical", "high", "normal", "low", "batch"):
            name = f"bench.task_{t}"
            for i in range(20):
                capture.count(name, queue, "received")
                capture.count(name, queue, "succeeded" if i % 10 else "failed")
                capture.observe(name, queue, "runtime", 0.001 * (i + 1) * (t + 1))
                capture.observe(name, queue, "wait", 0.002 * (i + 1))
    capture.flush()
    capture.close()
    client = redis.Redis.from_url(url)
    keys = Keys(settings.namespace)
    now = time.time()
    for w in range(4):
        host = f"worker{w}@bench"
        client.zadd(keys.workers(), {host: now})
        client.set(
            keys.worker_heartbeat(host),
            json.dumps({"hostname": host, "at": now, "memory_pct": 40.0 + w, "cpu_pct": 20.0 + w}),
            ex=600,
        )
    client.hset(
        keys.alerts(),
        "queue_depth@normal",
        json.dumps(
            {
                "id": "queue_depth@normal",
                "alertname": "queue_depth",
                "severity": "warning",
                "state": "firing",
                "since": now,
                "resolved_at": None,
                "value": 1200.0,
                "threshold": 1000.0,
                "labels": {"queue": "normal"},
                "summary": "normal is deep",
            }
        ),
    )
    client.lpush("normal", *[b"{}"] * 50)
    client.close()


def _flower(port: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.apps.core_plain",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        "--logging=warning",
        f"--basic_auth={FLOWER_USER}",
    ]
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


#: Flower runs with basic auth, as taskyard runs it (and as the stats API runs with a user).
FLOWER_USER = "bench:bench-password"
FLOWER_AUTH = "Basic " + base64.b64encode(FLOWER_USER.encode()).decode()


def _api_user(redis_url: str) -> str:
    """Turns the API's logins on (one viewer) and returns its bearer Authorization value."""
    from taskyard.keys import Keys
    from taskyard.monitoring.api.users import Role, UserStore

    users = UserStore(redis.Redis.from_url(redis_url), Keys())
    users.add("bench", Role.VIEWER, "bench-password-long")
    return f"Bearer {users.issue_token('bench')}"


#: Snapshots per series the dashboard finds: one hour at the default 10 s interval.
SERIES_HOUR = 360


def _seed_series(url: str, database_url: str) -> None:
    """An hour of history: three real stats collections, then the newest snapshot of each
    series copied back in time every 10 s, so the dashboard reads and draws full-size series."""
    from taskyard.config import load_settings
    from taskyard.monitoring.api.app import _resolve
    from taskyard.monitoring.collect import collect
    from taskyard.monitoring.store import SERIES

    runtime, _app = _resolve(load_settings(redis_url=url, database_url=database_url))
    now = time.time()
    for back in (20.0, 10.0, 0.0):
        collect(runtime, now=now - back)
    client, keys = runtime.redis, runtime.keys
    for name in SERIES:
        newest = client.lindex(keys.series(name), 0)
        if not newest:
            continue
        snapshot = json.loads(newest)
        with client.pipeline(transaction=False) as pipe:
            for i in range(3, SERIES_HOUR):
                pipe.rpush(keys.series(name), json.dumps({**snapshot, "at": now - 10.0 * i}))
            pipe.execute()


class _Workload:
    """A plain `celery worker -E` and a producer sending no-op tasks at a steady rate."""

    def __init__(self, workdir: Path) -> None:
        env = {**os.environ, "BENCH_CORE_REDIS_URL": BENCH_REDIS_URL}
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "benchmarks.apps.core_plain",
                "worker",
                "-c",
                "1",
                "-E",
                "--loglevel",
                "WARNING",
                "-n",
                "bench-api@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=ROOT,
            env=env,
            stdout=(workdir / "worker.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.producer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import time\nfrom benchmarks.apps.core_plain import noop\n"
                    f"gap = 1.0 / {WORKLOAD_PER_S}\nnext_at = time.monotonic()\n"
                    "while True:\n    noop.delay()\n    next_at += gap\n"
                    "    time.sleep(max(0.0, next_at - time.monotonic()))\n"
                ),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def done(self) -> int:
        client = redis.Redis.from_url(BENCH_REDIS_URL)
        try:
            return int(client.get("bench:done") or 0)
        finally:
            client.close()

    def stop(self) -> None:
        for process in (self.producer, self.worker):
            _stop(process)


def _pages(
    api_port: int,
    api: subprocess.Popen[bytes],
    flower_port: int,
    flower: subprocess.Popen[bytes],
    rounds: int,
    seconds: float,
    api_auth: str,
) -> dict[str, Any]:
    """Alternating rounds: our dashboard and /metrics beside Flower's page and /metrics, each
    request carrying its server's credentials (a user's token; Flower's basic auth)."""
    targets = {
        "dashboard": (api_port, api, "/dashboard?refresh=0", api_auth),
        "flower_page": (flower_port, flower, "/", FLOWER_AUTH),
        "metrics": (api_port, api, "/metrics", api_auth),
        "flower_metrics": (flower_port, flower, "/metrics", FLOWER_AUTH),
    }
    for port, _process, path, auth in targets.values():
        load(port, path, 1.0, auth)  # warm up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (port, process, path, auth) in targets.items():
            before = tree_cpu_s(process.pid)
            figures = load(port, path, seconds, auth)
            figures["cpu_ms_per_request"] = (
                (tree_cpu_s(process.pid) - before) * 1000 / max(1, figures["requests"])
            )
            runs[name].append(figures)
    import statistics

    out: dict[str, Any] = {}
    for name, results in runs.items():
        out[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("rps", "p50_ms", "p99_ms", "cpu_ms_per_request")
        }
        out[name]["requests"] = sum(r["requests"] for r in results)
        out[name]["errors"] = sum(r["errors"] for r in results)
        out[name]["p99_rounds"] = [round(r["p99_ms"], 1) for r in results]
    return out


def _page_rows(pages: dict[str, Any], rounds: int, seconds: float, done: int) -> list[Result]:
    setup = (
        f"{CONNECTIONS} keep-alive connections, {rounds} alternating round(s) of "
        f"{seconds:.0f} s per target, one uvicorn worker (api_cache_s=1.0) vs one Flower, "
        f"a celery worker -E running {WORKLOAD_PER_S:.0f} no-op tasks/s ({done} done), "
        "2 shared cores"
    )
    rows = []
    for mine, theirs, label, what in (
        ("dashboard", "flower_page", "dashboard", "/dashboard vs Flower's / (workers page)"),
        ("metrics", "flower_metrics", "metrics_under_work", "/metrics vs Flower's /metrics"),
    ):
        a, b = pages[mine], pages[theirs]
        note = (
            f"{what}; {setup}; p99 per round {a['p99_rounds']} vs {b['p99_rounds']} ms; "
            f"{a['requests']} vs {b['requests']} requests, {a['errors']} vs {b['errors']} "
            "errors"
        )
        rows.append(
            Result(
                f"monitoring.api.{label}",
                "p99 latency",
                "ms",
                a["p99_ms"],
                b["p99_ms"],
                "<= 50 ms and below Flower's",
                False,
                f"p50 {a['p50_ms']:.1f} vs {b['p50_ms']:.1f} ms; {note}",
            )
        )
        rows.append(
            Result(
                f"monitoring.api.{label}", "requests/s", "req/s", a["rps"], b["rps"], "", True, note
            )
        )
        rows.append(
            Result(
                f"monitoring.api.{label}",
                "server CPU per request",
                "ms",
                a["cpu_ms_per_request"],
                b["cpu_ms_per_request"],
                "",
                False,
                "user+sys of the server process / requests served",
            )
        )
    return rows


def run(quick: bool) -> list[Result]:
    seconds = QUICK_DURATION_S if quick else DURATION_S
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    client.flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="taskyard-bench-api-"))
    database_url = f"sqlite:///{workdir / 'history.db'}"
    _seed(BENCH_REDIS_URL, database_url)
    _seed_series(BENCH_REDIS_URL, database_url)
    # Authentication on: every request proves who it is (a viewer's bearer token).
    api_auth = _api_user(BENCH_REDIS_URL)

    port = free_port()
    env = {
        **os.environ,
        "TASKYARD_REDIS_URL": BENCH_REDIS_URL,
        "TASKYARD_DATABASE_URL": database_url,
        "TASKYARD_MONITORING__API_PORT": str(port),
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "taskyard.cli", "api", "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    figures: dict[str, dict[str, Any]] = {}
    try:
        _wait_http(f"http://127.0.0.1:{port}/health/live", api)
        for path in ("/api/v1/overview", "/metrics"):
            load(port, path, 1.0, api_auth)  # warm up: imports, connections, first store reads
            figures[path] = load(port, path, seconds, api_auth)
    finally:
        _stop(api)

    flower_port = free_port()
    flower = _flower(flower_port)
    flower_figures: dict[str, Any] | None = None
    flower_note = ""
    try:
        _wait_http(f"http://127.0.0.1:{flower_port}/metrics", flower)
        load(flower_port, "/metrics", 1.0, FLOWER_AUTH)
        flower_figures = load(flower_port, "/metrics", seconds, FLOWER_AUTH)
    except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        flower_note = f"Flower not measured: {exc}"
    finally:
        _stop(flower)

    # The dashboard and /metrics beside Flower's page and /metrics, while a worker runs.
    rounds = QUICK_PAGE_ROUNDS if quick else PAGE_ROUNDS
    page_s = QUICK_PAGE_SECONDS if quick else PAGE_SECONDS
    workload = _Workload(workdir)
    api = subprocess.Popen(
        [sys.executable, "-m", "taskyard.cli", "api", "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    flower = _flower(flower_port)
    page_rows: list[Result] = []
    try:
        _wait_http(f"http://127.0.0.1:{port}/health/live", api)
        _wait_http(f"http://127.0.0.1:{flower_port}/metrics", flower)
        pages = _pages(port, api, flower_port, flower, rounds, page_s, api_auth)
        page_rows = _page_rows(pages, rounds, page_s, workload.done())
    finally:
        _stop(api)
        _stop(flower)
        workload.stop()
    client.flushdb()
    client.close()

    rows = []
    setup = (
        f"{CONNECTIONS} keep-alive connections, {seconds:.0f} s, one uvicorn worker, "
        f"api_cache_s=1.0, 2 shared cores, authentication on (a viewer's bearer token; "
        "Flower with basic auth)"
    )
    for path, label in (("/api/v1/overview", "overview"), ("/metrics", "metrics")):
        mine = figures[path]
        other = flower_figures if path == "/metrics" else None
        note = f"{setup}; {mine['requests']} requests, {mine['errors']} non-200"
        if path == "/metrics":
            note += (
                "; celery = Flower /metrics, same load"
                if other
                else f"; {flower_note or 'Flower not measured'}"
            )
        else:
            note += "; plain Celery has no stats API (celery: none)"
        rows.append(
            Result(
                f"monitoring.api.{label}",
                "requests/s",
                "req/s",
                mine["rps"],
                other["rps"] if other else None,
                ">= 500 req/s",
                True,
                note,
            )
        )
        rows.append(
            Result(
                f"monitoring.api.{label}",
                "p99 latency",
                "ms",
                mine["p99_ms"],
                other["p99_ms"] if other else None,
                "<= 50 ms",
                False,
                f"p50 {mine['p50_ms']:.1f} ms"
                + (f"; Flower p50 {other['p50_ms']:.1f} ms" if other else ""),
            )
        )
    return rows + page_rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        _load_main(sys.argv[2:])
    else:
        for row in run(quick="--quick" in sys.argv):
            print(row)
