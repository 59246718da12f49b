"""Apps the tests start workers on, and what several of them share."""

from __future__ import annotations

from typing import Any


def record_stack_kinds(task: Any, client: Any, key: str) -> str:
    """Record (at ``key``) and return the kinds of stack Celery keeps ``task``'s request and the
    current task in: ``_FastLocalStack`` where the worker runs with Celery's USE_FAST_LOCALS
    (``taskyard worker`` sets it: taskyard.workers.profiles)."""
    from celery import _state

    kinds = f"{type(task.request_stack).__name__},{type(_state._task_stack).__name__}"
    client.set(key, kinds)
    return kinds
