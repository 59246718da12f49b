"""A plain Celery app (kombu's Redis transport, Celery's defaults) with the tasks of
:mod:`tests.apps.fastsend`: it runs messages that taskyard's fast path sent."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from tests.apps.fastsend_runs import record

URL = os.environ.get("TASKYARD_REDIS_URL", "redis://127.0.0.1:6379/9")
app = Celery("fastsend-plain", broker=URL, backend=URL)
_client = redis.Redis.from_url(URL)


@app.task(name="fastsend.echo", bind=True)
def echo(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
    record(self, "plain", args, kwargs, _client)
    return [list(args), kwargs]
