"""The reaper: age flushes and expired leases, independent of producers.

:func:`reap` claims every buffer whose oldest item has waited ``max_wait`` and republishes every
batch whose lease ran out, for all batch names registered in Redis. It reads each batch's
definition from Redis (``Keys.batch_conf``), so it needs none of the application's modules, and
it is safe to run from many processes at once: each claim and each re-armed lease is one atomic
script, so concurrent reapers never claim an item twice or republish a batch twice per lease.

It runs in two places: a :func:`flusher` thread in each worker's main process (started on
``worker_ready``, every ``reaper_interval_s``), and the ``taskyard.batching.reap`` task that beat
sends (the periodic-jobs schedule) as a safety net.
"""

from __future__ import annotations

import logging
import time

from redis.client import Pipeline

from taskyard.batching.buffer import BatchBuffer, run_pipeline
from taskyard.batching.producer import publish
from taskyard.outage import Periodic
from taskyard.runtime import TaskyardApp, runtime_of
from taskyard.serialization import text

log = logging.getLogger(__name__)

#: Name of the periodic reaper task (the beat schedule refers to it by this name).
REAP_TASK = "taskyard.batching.reap"
#: A batch's definition is re-read from Redis at most this often (s).
_CONF_TTL_S = 5.0


def _definitions(app: TaskyardApp) -> dict[str, dict[str, str]]:
    # The registry is read on every pass, so a new batch name is reaped at once.
    runtime = runtime_of(app)
    confs = runtime.batch_definitions
    client, keys = runtime.redis, runtime.keys
    names = sorted(text(n) for n in client.smembers(keys.batch_registry()))
    now = time.monotonic()
    stale = [
        n for n in names if n not in confs or not confs[n][1] or now - confs[n][0] >= _CONF_TTL_S
    ]
    if stale:
        pipe = client.pipeline(transaction=False)
        for name in stale:
            pipe.hgetall(keys.batch_conf(name))
        for name, conf in zip(stale, pipe.execute(), strict=True):
            confs[name] = (now, {text(k): text(v) for k, v in conf.items()})
    return {name: confs[name][1] for name in names if confs[name][1]}


def reap(app: TaskyardApp) -> dict[str, int]:
    """Flush aged buffers and republish expired batches of every batch name, once.

    Returns counts: ``claimed`` batches (age flushes) and ``republished`` batches.
    """
    runtime = runtime_of(app)
    confs = _definitions(app)
    if not confs:
        return {"claimed": 0, "republished": 0}
    buffers = {name: BatchBuffer(runtime.redis, runtime.keys, name) for name in confs}

    def build(pipe: Pipeline) -> None:
        for name, conf in confs.items():
            buffers[name].queue_reap(
                pipe,
                max_wait_ms=int(conf["max_wait_ms"]),
                batch_size=int(conf["batch_size"]),
                lease_ms=int(conf["lease_ms"]),
            )

    replies = run_pipeline(runtime.redis, build)
    claimed = republished = 0
    for (name, conf), reply in zip(confs.items(), replies, strict=True):
        new, expired = BatchBuffer.reap_result(reply)
        if new:
            publish(app, conf["task"], conf["level"], name, new, "age")
            claimed += len(new)
        if expired:
            publish(app, conf["task"], conf["level"], name, expired, None)
            republished += len(expired)
            log.info(
                "batch %s: republished %d batches whose lease ran out: %s",
                name,
                len(expired),
                ", ".join(c.batch_id for c in expired[:10]),
            )
    return {"claimed": claimed, "republished": republished}


def flusher(app: TaskyardApp, interval_s: float) -> Periodic:
    """A thread running :func:`reap` every ``interval_s`` (start it; a daemon thread)."""
    return Periodic(
        "taskyard-batch-flusher", interval_s, lambda: reap(app), log, "batch flusher: reaping"
    )
