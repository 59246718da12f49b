"""Traces cross processes: producer spans at publish, consumer spans around runs, one trace.

A real prefork worker with ``max_tasks_per_child=1`` (each child runs one task and exits, the
case that loses spans when a provider is not flushed at child exit) exports over OTLP/HTTP to a
receiver this test runs; the producer is a fresh interpreter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from taskyard.testing import celery_worker, run_python, wait_until

pytestmark = pytest.mark.slow

otlp = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

PRODUCER, CONSUMER = 4, 5  # opentelemetry.proto.trace.v1.Span.SpanKind


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def snapshot(self) -> list[Any]:
        with self.lock:
            return list(self.spans)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = otlp.ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()
        self.wfile.write(otlp.ExportTraceServiceResponse().SerializeToString())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _runs(spans: list[Any], name: str) -> list[Any]:
    return [s for s in spans if s.kind == CONSUMER and s.name == f"run tests.apps.traced.{name}"]


def test_every_run_joins_its_producers_trace_under_prefork_recycling(
    redis_client: redis.Redis, redis_env: dict[str, str], receiver: Receiver, tmp_path: Path
) -> None:
    env = {
        **redis_env,
        "TASKYARD_TRACING": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "traced-test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    leaves = 12
    with celery_worker(
        "tests.apps.traced",
        "normal",
        env,
        tmp_path,
        concurrency=2,
        name="traced",
        extra=("--max-tasks-per-child=1",),
    ):
        run_python(
            env,
            "from tests.apps.traced import hop, leaf, retry_once\n"
            f"for i in range({leaves}): leaf.delay(i)\n"
            "leaf.apply_async((99,), countdown=0.3)\n"
            "hop.delay(2)\n"
            "retry_once.delay('m')\n",
        )
        # 12 leaves + 1 countdown + 3 hops + 2 runs of retry_once.
        wait_until(
            lambda: len([s for s in receiver.snapshot() if s.kind == CONSUMER]) >= leaves + 6,
            90,
            0.2,
            "every run's consumer span to be exported",
        )
    spans = receiver.snapshot()
    producers = {(s.trace_id, s.span_id): s for s in spans if s.kind == PRODUCER}
    consumers = [s for s in spans if s.kind == CONSUMER]
    assert len(_runs(spans, "leaf")) == leaves + 1, "a recycled child lost its span"
    for span in consumers:
        # Each run's parent is the producer span of its own message, in the same trace.
        assert (span.trace_id, span.parent_span_id) in producers, span.name
    hops = _runs(spans, "hop")
    assert len(hops) == 3 and len({s.trace_id for s in hops}) == 1, "a task sent by a task"
    retries = _runs(spans, "retry_once")
    assert len(retries) == 2 and len({s.trace_id for s in retries}) == 1, "a retry"
    assert {s.status.code for s in retries} == {0, 2} or any(
        e.name == "retry" for s in retries for e in s.events
    )
    leaf_traces = {s.trace_id for s in _runs(spans, "leaf")}
    assert len(leaf_traces) == leaves + 1, "separate .delay() calls are separate traces"


def test_tracing_without_the_sdk_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from taskyard import ConfigurationError, tracing

    real_import = builtins.__import__

    def no_sdk(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    with pytest.raises(ConfigurationError, match=r"taskyard\[otel\]"):
        tracing._require_sdk()
