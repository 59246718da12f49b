"""Flow control at reservation: cluster-wide rate and concurrency limits, fair share between
partition values, durable pause and resume (docs/flow.md).

The decision is made in the fetch script (broker/control/flow.lua) from the rules HASH this
package writes; here are the decorator options, the worker's registration of what its tasks
declare, the partition header on publish, and the functions behind the command line and API.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import before_task_publish, worker_init

from taskyard.config import redis_client_url
from taskyard.flow.control import FlowStore, Limits, glob_to_pattern
from taskyard.flow.options import PARTITION_HEADER, FlowSpec, Rate, parse_rate, take_flow_options
from taskyard.runtime import Runtime, redis_client, runtime_of, sending_app
from taskyard.seams import Seam

# What this package relies on in Celery (checked by tests/test_seams.py): the worker's start
# signal (its sender carries the app), the publish signal whose headers dict is the one sent,
# Celery's per-worker rate limit, a task attribute the decorators set to None.
SEAMS = (
    Seam("celery.signals", "worker_init", "attribute"),
    Seam("celery.signals", "before_task_publish", "attribute"),
    Seam("celery.app.task.Task", "rate_limit", "attribute", value=None),
    Seam("celery.apps.worker.Worker", "app", "instance"),
)

logger = logging.getLogger(__name__)


def store_of(app: Any) -> FlowStore:
    """The flow store of a taskyard app: the broker's Redis, kombu's key prefix, the app's
    namespace."""
    runtime = runtime_of(app)
    return store_for(runtime, app)


def store_for(runtime: Runtime, app: Any = None) -> FlowStore:
    """The flow store of ``runtime`` (kombu's key prefix from ``app``'s transport options)."""
    store = runtime.flow_store
    if not isinstance(store, FlowStore):
        settings = runtime.settings
        client = redis_client(
            redis_client_url(settings.effective_broker_url),
            socket_connect_timeout=settings.broker_connect_timeout_s,
            socket_timeout=max(settings.broker_connect_timeout_s, 5.0),
        )
        options = (app.conf.broker_transport_options if app is not None else None) or {}
        store = FlowStore(client, runtime.keys, str(options.get("global_keyprefix") or ""))
        runtime.flow_store = store
    return store


def declared_specs(app: Any) -> dict[str, dict[str, Any]]:
    """Task name -> declared limits, for every task of ``app`` with flow options."""
    out = {}
    for name, task in app.tasks.items():
        spec = getattr(task, "taskyard_flow", None)
        if isinstance(spec, FlowSpec):
            out[name] = spec.as_json()
    return out


def _on_publish(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
    # Runs for every publish: a task lookup in the sending app, more only for partitioned tasks.
    app = sending_app.get()
    if app is None or not isinstance(sender, str):
        return
    task = app.tasks.get(sender) if app.finalized else None
    spec = getattr(task, "taskyard_flow", None)
    if not isinstance(spec, FlowSpec) or not spec.partitioned or not isinstance(headers, dict):
        return
    if PARTITION_HEADER in headers:
        return
    try:
        args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) else ((), {})
        value = spec.partition_of(args, kwargs)
    except Exception:
        logger.warning("partition_by of %s failed; sent without a partition", sender, exc_info=True)
        return
    if value is not None:
        headers[PARTITION_HEADER] = value


def install(app: Any, runtime: Runtime) -> None:
    """Register, at worker start, what the app's tasks declare; stamp partition values on
    publish. No I/O here."""

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        specs = declared_specs(app)
        if not specs:
            return
        settings = runtime.settings
        lease = settings.reservation_lease_s or settings.visibility_timeout_s
        try:
            store_for(runtime, app).declare(specs, lease)
        except Exception:
            logger.warning("could not register the tasks' flow limits", exc_info=True)

    worker_init.connect(on_worker_init, weak=False, dispatch_uid=f"taskyard.flow.{id(app)}")
    before_task_publish.connect(_on_publish, weak=False, dispatch_uid="taskyard.flow.publish")


__all__ = [
    "PARTITION_HEADER",
    "FlowSpec",
    "FlowStore",
    "Limits",
    "Rate",
    "declared_specs",
    "glob_to_pattern",
    "install",
    "parse_rate",
    "store_for",
    "store_of",
    "take_flow_options",
]
