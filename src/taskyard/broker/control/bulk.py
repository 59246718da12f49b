"""``delay_many``/``apply_many``: many task messages, one script call per chunk.

The messages are the ones the fast ``.delay()`` path builds (:mod:`taskyard.broker.publish`,
protocol 2, same headers and properties), routed the same way (the per-call level, else the
app's router, asked once per bulk call: taskyard's rules route by task name) and carrying the
same ``taskyard_unique`` header, so unique/throttle keys are honoured per message inside the
chunk's script. A whole chunk is serialized before any of it is sent: an argument the JSON
policy refuses stops the bulk call with nothing of its chunk published.

Signals: none per message. ``before_task_publish``/``after_task_publish`` are not sent (their
receivers would cost more than the publish itself); the send time header the capture reads
(``taskyard_sent_at``) is written directly, so wait times, timelines from "received" on and
``taskyard cancel --older-than`` work. Celery's ``task_sent`` is never sent either. A task the
fast path does not serve (options of its own, another broker) falls back to one
``apply_async`` per call, which sends every signal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from time import time
from typing import Any

from celery._state import get_current_worker_task
from celery.utils.saferepr import saferepr
from kombu.exceptions import EncodeError
from kombu.serialization import registry

from taskyard.broker.control.jobs import HEADER_SENT_AT, publish_bulk
from taskyard.errors import BrokerUnavailable, BulkPublishError
from taskyard.seams import Seam

# What this module relies on beyond the fast publisher's own (its SEAMS): the worker's current
# task (parent and root ids), the message layout kombu's virtual channel builds.
SEAMS = (
    Seam("celery._state", "get_current_worker_task"),
    Seam("kombu.transport.virtual.Channel", "encode_body", params=("body", "encoding")),
)

# kombu's virtual channel methods are unannotated.
# mypy: disable-error-code="no-untyped-call"

LockFor = Callable[[Any, Any], "list[Any] | None"]


def send_many(
    publisher: Any,
    task: Any,
    calls: Iterable[tuple[Any, Any]],
    queue: str | None,
    lock_for: LockFor,
    chunk_size: int,
) -> list[str] | None:
    """Publish every (args, kwargs) of ``calls``; the ids in order, or None when the fast path
    does not serve ``task`` (the caller then sends one by one).

    Raises:
        BulkPublishError: a chunk was refused by the serializer (nothing of it was sent).
        BrokerUnavailable: the broker refused a chunk (earlier chunks were sent).
    """
    app = publisher.app
    template = publisher.template(task) if publisher.enabled else None
    if template is None or app.conf.task_always_eager:
        return None
    link = publisher._connected()
    if link is None:
        return None
    channel = link.channel
    parent = get_current_worker_task()
    if parent is not None and app.conf.task_inherit_parent_priority and template.priority is None:
        return None
    if queue is None:
        route = publisher.router(task.name, (), {}, {}, task=task)
        queue = route["queue"]
    destination = publisher._destination(link, queue)
    if destination is None:
        return None
    if queue not in link.declared:
        from kombu.common import maybe_declare

        maybe_declare(destination.queue, channel)
        link.declared.add(queue)

    name = task.name
    parent_id = parent.request.id if parent is not None else None
    parent_root = (parent.request.root_id or parent.request.id) if parent is not None else None
    priority = template.priority or channel.default_priority
    maxlevels = template.repr_maxlevels
    serializer = template.serializer
    body_encoding = channel.body_encoding
    check = template.check
    # The parts every message of this call shares, encoded once; each message's own fields
    # (ids, argument reprs, send time, lock, body) are spliced in as JSON text. The result is
    # the message the fast .delay() path builds (same keys and values; key order aside).
    fixed_headers = _json(
        {
            "lang": "py",
            "task": name,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": list(template.timelimit),
            "parent_id": parent_id,
            "origin": publisher._origin_name(),
            "ignore_result": task.ignore_result,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }
    )[1:-1]
    fixed_properties = _json(
        {
            "reply_to": app.thread_oid,
            "delivery_mode": destination.delivery_mode_value,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
        }
    )[1:-1]
    base_message = {"properties": {"priority": priority}}
    list_key, wake_key = channel.publish_keys(queue, base_message)

    ids: list[str] = []
    published = 0
    chunk: list[tuple[str, str, str, int, str]] = []
    start = 0
    for index, call in enumerate(calls):
        args, kwargs = call
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if check is not None:
            check(*args, **kwargs)
        if not chunk:
            fresh = _uuids(2 * chunk_size)
        task_id, tag = next(fresh), next(fresh)
        lock = lock_for(args, kwargs)
        unique = ""
        if lock is not None:
            if lock[0] == "debounce":
                raise BulkPublishError(
                    name,
                    "a debounced task cannot be sent in bulk",
                    published=published,
                    index=index,
                )
            unique = f', "taskyard_unique": {_json(lock)}'
        body = (args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        try:
            content_type, content_encoding, payload = registry.dumps(body, serializer=serializer)
        except EncodeError as exc:
            raise BulkPublishError(name, str(exc), published=published, index=index) from exc
        encoded, used_encoding = channel.encode_body(payload, body_encoding)
        message = (
            f'{{"body": {_str(encoded)}, "content-encoding": {_str(content_encoding)}, '
            f'"content-type": {_str(content_type)}, "headers": {{{fixed_headers}, '
            f'"id": "{task_id}", "root_id": "{parent_root or task_id}", '
            f'"argsrepr": {_str(_repr(args, maxlevels) if args else "()")}, '
            f'"kwargsrepr": {_str(_repr(kwargs, maxlevels) if kwargs else "{}")}, '
            f'"{HEADER_SENT_AT}": {time()!r}{unique}}}, "properties": {{"correlation_id": '
            f'"{task_id}", {fixed_properties}, "body_encoding": {_str(used_encoding)}, '
            f'"delivery_tag": "{tag}"}}}}'
        )
        mode, lock_key, ttl = lock if lock is not None else ("", "", 0)
        chunk.append((lock_key, mode, task_id, ttl, message))
        ids.append(task_id)
        if len(chunk) >= chunk_size:
            published += _flush(link, name, list_key, wake_key, chunk, ids, start)
            start = len(ids)
            chunk = []
    if chunk:
        _flush(link, name, list_key, wake_key, chunk, ids, start)
    return ids


_json = json.JSONEncoder(separators=(", ", ": ")).encode
_str = json.encoder.encode_basestring_ascii
#: Scalars whose repr() is what Celery's saferepr writes for them (strings only without quotes
#: or escapes, where the two choose quotes differently).
_PLAIN = (int, float, bool, type(None))


def _repr(value: Any, maxlevels: int) -> str:
    """Celery's ``saferepr(value, 1024)`` for the common flat arguments, cheaper."""
    items = value.values() if isinstance(value, dict) else value
    if all(
        isinstance(item, _PLAIN)
        or (
            isinstance(item, str)
            and len(item) < 256
            and item.isprintable()
            and "'" not in item
            and '"' not in item
            and "\\" not in item
        )
        for item in items
    ):
        text = repr(value)
        if len(text) <= 1024:
            return text
    return str(saferepr(value, 1024, maxlevels=maxlevels))


def _uuids(n: int) -> Iterator[str]:
    """``n`` random version-4 UUIDs as text, from one read of the OS's random source."""
    raw = os.urandom(16 * n).hex()
    for i in range(0, 32 * n, 32):
        h = raw[i : i + 32]
        yield (f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}")


def _flush(
    link: Any,
    name: str,
    list_key: str,
    wake_key: str,
    chunk: list[tuple[str, str, str, int, str]],
    ids: list[str],
    start: int,
) -> int:
    try:
        owners = publish_bulk(link.channel, name, [(list_key, wake_key, chunk)])
    except link.connection_errors as exc:
        raise BrokerUnavailable(name, "the broker", f"{exc}; {start} call(s) published") from exc
    for offset, owner in enumerate(owners):
        if owner:
            # Deduplicated: the caller gets the owner's id, as .delay() returns it.
            ids[start + offset] = owner
    return len(chunk)
