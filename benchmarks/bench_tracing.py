"""Tracing overhead: worker CPU per task with ``TASKYARD_TRACING`` on against off, same run.

Both sides are ``taskyard worker --profile all -c 2`` (prefork) draining the same backlog of
no-op tasks, sent by a fresh interpreter with the same tracing setting (so traced runs have a
producer parent to extract, as in production). Spans go over OTLP/HTTP to a sink in this
process that answers each export at once, so the figure is taskyard's cost (span creation,
context propagation, batch export from each pool process), not a collector's. Sides alternate
within each round; the figures are the round with the median ratio.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from benchmarks import bench_core
from benchmarks.common import Result
from taskyard.testing import run_python


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _drain(
    on: bool, n: int, client: redis.Redis, log_dir: Path, endpoint: str
) -> tuple[float, float]:
    env = {
        **bench_core.ENV,
        "TASKYARD_TRACING": "true" if on else "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
    }
    client.flushdb()
    run_python(
        env,
        "from benchmarks.apps.core_taskyard import app\n"
        "task = app.tasks['bench.ty.noop']\n"
        f"for _ in range({n}): task.delay()\n",
        timeout_s=600,
    )
    worker = bench_core.Worker("taskyard", log_dir, env)
    try:
        bench_core.wait_until(lambda: bool(client.exists("bench:first")), 120, 0.002, "start")
        cpu0, done0 = worker.cpu_s(), bench_core._done(client)
        first = float(client.get("bench:first") or 0)
        bench_core._wait_done(client, worker, n, f"tracing={on} to drain {n}")
        end, cpu1 = time.time(), worker.cpu_s()
    finally:
        worker.stop()
    client.flushdb()
    return n / (end - first), (cpu1 - cpu0) / max(1, n - done0) * 1e6


def run(quick: bool = False) -> list[Result]:
    n, rounds = (500, 1) if quick else (4000, 3)
    client = redis.Redis.from_url(bench_core.REDIS_URL)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    load_start = os.getloadavg()[0]
    samples: list[tuple[float, float, float, float]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(rounds):
                sides = (False, True) if i % 2 == 0 else (True, False)
                got = {on: _drain(on, n, client, Path(tmp), endpoint) for on in sides}
                off_rate, off_cpu = got[False]
                on_rate, on_cpu = got[True]
                print(
                    f"   round {i + 1}: off {off_rate:,.0f}/s {off_cpu:.0f} µs, "
                    f"on {on_rate:,.0f}/s {on_cpu:.0f} µs ({on_cpu / off_cpu:.2f}x CPU)"
                )
                samples.append((off_rate, off_cpu, on_rate, on_cpu))
    finally:
        server.shutdown()
    load_end = os.getloadavg()[0]
    ratios = [s[3] / s[1] for s in samples]
    median = samples[ratios.index(statistics.median_low(ratios))]
    notes = (
        f"rounds on/off CPU: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"load average {load_start:.2f} -> {load_end:.2f}"
    )
    return [
        Result(
            "tracing.overhead",
            "worker CPU per task, prefork drain, tracing on (vs off)",
            "µs",
            median[3],
            median[1],
            goal="on <= 1.1x off (ratio >= 0.91)",
            higher_is_better=False,
            notes=notes,
        ),
        Result(
            "tracing.overhead",
            "drain rate, prefork -c 2, tracing on (vs off)",
            "tasks/s",
            median[2],
            median[0],
            notes=notes,
        ),
    ]
