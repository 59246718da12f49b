"""What the fast publisher's test tasks record of their message, on either kind of worker."""

from __future__ import annotations

import json
from typing import Any

#: LIST of JSON records, one per run: what the worker read from the message.
RUNS_KEY = "test:fastsend:runs"


def record(task: Any, worker: str, args: Any, kwargs: Any, client: Any) -> None:
    """Push what ``task``'s current message carried onto :data:`RUNS_KEY`."""
    request = task.request
    client.rpush(
        RUNS_KEY,
        json.dumps(
            {
                "worker": worker,
                "id": request.id,
                "root_id": request.root_id,
                "parent_id": request.parent_id,
                "args": list(args),
                "kwargs": kwargs,
                "queue": (request.delivery_info or {}).get("routing_key"),
                "ignore_result": request.ignore_result,
            }
        ),
    )
