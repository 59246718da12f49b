"""Turning what the worker sees (a failed task, an expired one, a crashed or poison message) into
dead-letter entries, and recording them.

A failing record is logged and never reaches the task or the consumer (the caller decides what
happens to the message then). Each recorded entry is announced by the ``task_dead`` signal,
which the monitoring's timeline subscribes to.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

from taskyard.deadletters.entry import REPLAY_HEADER, DeadLetter, cap, to_json_text
from taskyard.deadletters.store import RedisDeadLetterStore
from taskyard.redaction import HEADER as REDACT_HEADER
from taskyard.signals import task_dead

log = logging.getLogger(__name__)

#: Message header with the time the task was sent (set by the monitoring capture).
SENT_HEADER = "taskyard_sent_at"


class Recorder:
    """Builds entries with one app's caps and writes them to its store."""

    def __init__(self, runtime: Any) -> None:
        settings = runtime.settings.dead_letters
        self.runtime = runtime
        self.payload_limit = settings.max_payload_bytes
        self.traceback_limit = settings.max_traceback_chars
        self._store: RedisDeadLetterStore | None = None

    @property
    def store(self) -> RedisDeadLetterStore:
        if self._store is None:
            self._store = RedisDeadLetterStore.for_runtime(self.runtime)
        return self._store

    def record(self, entry: DeadLetter) -> bool:
        """Write ``entry``; False (logged) when the store cannot be reached."""
        try:
            self.store.record(entry)
        except Exception:
            log.exception(
                "dead letter %s (%s, %s) not recorded", entry.id, entry.reason, entry.name
            )
            return False
        task_dead.send(
            sender=entry.name or "-",
            task_id=entry.id,
            reason=entry.reason,
            queue=entry.queue,
            detail=entry.detail or entry.exception_type,
        )
        return True

    # --- building entries ---------------------------------------------------------------------
    def arguments(self, args: Any, kwargs: Any) -> dict[str, Any]:
        args_text, args_ok = to_json_text(list(args or ()), self.payload_limit)
        kwargs_text, kwargs_ok = to_json_text(dict(kwargs or {}), self.payload_limit)
        return {"args": args_text, "kwargs": kwargs_text, "replayable": args_ok and kwargs_ok}

    def exception(self, exc: BaseException | None, traceback: str | None) -> dict[str, Any]:
        if exc is None:
            return {}
        message, _ = cap(str(exc), self.payload_limit)
        trace, _ = cap(traceback or "", self.traceback_limit)
        return {"exception_type": type(exc).__name__, "exception": message, "traceback": trace}

    def from_request(
        self,
        reason: str,
        task_name: str,
        task_id: str,
        request: Any,
        args: Any,
        kwargs: Any,
        **extra: Any,
    ) -> DeadLetter:
        """An entry for a task the worker ran (or refused to run) under ``request``."""
        info = getattr(request, "delivery_info", None) or {}
        sent = _float(getattr(request, SENT_HEADER, None))
        retries = int(getattr(request, "retries", 0) or 0)
        fields: dict[str, Any] = {
            "queue": str(info.get("routing_key") or info.get("queue") or ""),
            "attempts": retries + 1,
            "worker": str(getattr(request, "hostname", "") or ""),
            "first_at": sent or 0.0,
            "replay_of": str(getattr(request, REPLAY_HEADER, "") or ""),
            **self.arguments(args, kwargs),
        }
        rule = getattr(request, REDACT_HEADER, None)
        if isinstance(rule, dict) and rule:
            # What views must withhold (positional arguments by their names at publish).
            fields["headers"] = {REDACT_HEADER: rule}
        fields.update(extra)
        return DeadLetter(id=task_id, reason=reason, name=task_name, **fields)

    def from_message(
        self,
        reason: str,
        message: Any,
        *,
        detail: str,
        worker: str,
        payload: Any = None,
        deliveries: int = 1,
        exc: BaseException | None = None,
    ) -> DeadLetter:
        """An entry for a broker message: a crashed task's (``payload`` decoded) or a poison one
        (raw body and headers kept, capped)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        info = message.delivery_info or {}
        task_id = headers.get("id")
        name = headers.get("task")
        fields: dict[str, Any] = {
            "name": name if isinstance(name, str) else "",
            "queue": str(info.get("routing_key") or ""),
            "worker": worker,
            "deliveries": deliveries,
            "detail": detail,
            "content_type": str(message.content_type or ""),
            "first_at": _float(headers.get(SENT_HEADER)) or 0.0,
            "replay_of": str(headers.get(REPLAY_HEADER) or ""),
        }
        retries = headers.get("retries")
        if isinstance(retries, int):
            fields["attempts"] = retries + 1
        if exc is not None:
            fields.update(self.exception(exc, None))
        if reason == "poison":
            raw = self.raw(message)
            cut = raw.pop("cut")
            # Only a task this worker did not know can run once deployed, and only whole.
            fields["replayable"] = detail.startswith("unknown task") and not cut
            fields.update(raw)
        elif _is_task_body(payload):
            fields.update(self.arguments(payload[0], payload[1]))
            if isinstance(headers.get(REDACT_HEADER), dict):
                fields["headers"] = {REDACT_HEADER: headers[REDACT_HEADER]}
        entry_id = task_id if isinstance(task_id, str) and task_id else _poison_id()
        return DeadLetter(id=entry_id, reason=reason, **fields)

    def raw(self, message: Any) -> dict[str, Any]:
        """The message's headers (JSON-safe, capped) and raw body (capped, text or base64), and
        whether the body was cut."""
        body = message.body
        if isinstance(body, str):
            text, encoding, cut = body, "utf-8", False
        else:
            whole = bytes(body or b"")
            raw, cut = whole[: self.payload_limit], len(whole) > self.payload_limit
            try:
                text, encoding = raw.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, encoding = base64.b64encode(raw).decode(), "base64"
        if encoding == "utf-8":
            text, cut_text = cap(text, self.payload_limit)
            cut = cut or cut_text
        headers_text = json.dumps(
            message.headers
            if isinstance(message.headers, dict)
            else {"_headers": repr(message.headers)},
            default=repr,
        )
        if len(headers_text) > self.payload_limit:
            headers: dict[str, Any] = {"_truncated": cap(headers_text, self.payload_limit)[0]}
        else:
            headers = json.loads(headers_text)
        return {
            "body": text,
            "body_encoding": encoding,
            "headers": headers,
            "cut": cut,
            "content_encoding": str(getattr(message, "content_encoding", "") or ""),
        }


def _is_task_body(payload: Any) -> bool:
    return (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
    )


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _poison_id() -> str:
    return f"poison-{uuid.uuid4().hex}"
