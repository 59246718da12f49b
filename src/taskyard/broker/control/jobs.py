"""Job control in the broker: unique locks at publish, durable cancel records, bulk publish.

Everything here lives in the broker's Redis (under kombu's ``global_keyprefix``) because the
fetch script reads it when a worker reserves (``control/jobs.lua``, a fragment of the fetch, ack,
release and renew scripts on the hook lists of ``broker/hooks.lua``):

* **Unique locks.** A unique, throttled or debounced task's message carries a header
  ``taskyard_unique = [mode, lock key after the script prefix, ttl ms]``. The transport's
  ``_put`` (both the fast ``.delay()`` path and Celery's own) hands such a message to
  :func:`publish_unique`: one script checks the lock, takes it with the message's id and
  pushes the message, so of many producers exactly one publishes; the others get
  :class:`~taskyard.errors.TaskDeduplicated` with the owner's id. At reservation the fetch
  deletes a "queued" lock, or re-leases an "active" one under the reservation lease and notes
  which delivery tag holds it; the release hook deletes it at ack (success, failure, dead
  letter, revoke), reject and restore, and the renew hook extends it with the reservation. A
  SIGKILLed worker's lock is no longer renewed and expires within the lease. Throttle locks
  just expire; a debounce lock names the pending member of the delayed set, which the next
  call replaces.
* **Cancel records.** A ZSET of task ids (plus a HASH of who and what became of them). Every
  fetch reads its size once (ZCARD) and checks each popped message only when it is non-empty;
  a cancelled message is consumed and never delivered. Workers also poll new records
  (:mod:`taskyard.broker.control.worker`) for messages they reserved before the cancel.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from taskyard.broker import delays as _delays
from taskyard.errors import TaskDeduplicated
from taskyard.keys import Keys
from taskyard.lua import Script

# redis-py's execute_command is unannotated.
# mypy: disable-error-code="no-untyped-call"

#: Header of a unique/throttled/debounced message: [mode, lock key, lock TTL (ms)].
HEADER_UNIQUE = "taskyard_unique"
#: Header carrying the send time (s since epoch) that --older-than reads (the capture's).
HEADER_SENT_AT = "taskyard_sent_at"
MODES = ("queued", "active", "throttle", "debounce")

UNIQUE_SCRIPT = Script.from_file("taskyard.broker", "publish_unique.lua")
BULK_SCRIPT = Script.from_file("taskyard.broker", "publish_bulk.lua")


# --- publishing ---------------------------------------------------------------------------------
def publish_unique(channel: Any, queue: str, message: dict[str, Any]) -> None:
    """Lock and publish ``message`` in one script call (the transport's ``_put`` for it).

    Raises:
        TaskDeduplicated: another message holds the key; nothing was published.
    """
    headers = message["headers"]
    mode, lock, ttl_ms = headers[HEADER_UNIQUE]  # lock: its name after the script prefix
    task_id = str(headers["id"])
    name = str(headers.get("task"))
    ns = channel._script_prefix
    entry = _delays.delayed_entry(channel, queue, message)
    if entry is not None:
        registry, zset, member, score = entry
        keys = [ns + lock, channel.full_key(zset), channel.full_key(registry)]
        kind, payload, due = "delayed", member, score
    else:
        if mode == "debounce":
            raise ValueError("a debounced message needs a countdown (broker-side delays on)")
        list_key, wake_key = channel.publish_keys(queue, message)
        keys = [ns + lock, list_key, wake_key]
        kind, payload, due = "list", channel.encode_message(message), int(time.time() * 1000)
    reply = UNIQUE_SCRIPT(
        channel.client,
        [*keys, ns + "jobs:counts"],
        [
            mode,
            task_id,
            payload,
            int(ttl_ms),
            channel.wake_maxlen,
            kind,
            due,
            queue,
            name,
            ns + "jobs:cancel:info",
        ],
    )
    if int(reply[0]) == 0:
        owner = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        raise TaskDeduplicated(name, owner, mode)


def announce_lease(channel: Any) -> None:
    """Tell the fetch script the reservation lease (ms) an "active" lock is held under.

    Written by each consuming channel when it starts; workers of one app share the setting.
    """
    redis.Redis.execute_command(
        channel.client, "SET", channel._script_prefix + "jobs:lease", channel.lease_ms
    )


def publish_bulk(
    channel: Any,
    task_name: str,
    groups: list[tuple[str, str, list[tuple[str, str, str, int, str]]]],
) -> list[str]:
    """Push a chunk in one script call: per (list key, wake key) group, records of (lock key or
    "", mode, task id, lock TTL ms, message JSON). Returns, per message, "" when published or
    the owner's id when its key was held."""
    ns = channel._script_prefix
    args: list[Any] = [channel.wake_maxlen, ns + "jobs:counts", task_name]
    for list_key, wake_key, records in groups:
        if not any(lock for lock, *_ in records):
            # Nothing to lock: the messages alone (a fifth of the words to send and parse).
            args += (list_key, wake_key, len(records), 0, *(record[4] for record in records))
            continue
        args += (list_key, wake_key, len(records), 1)
        for lock, mode, task_id, ttl_ms, payload in records:
            args += (ns + lock if lock else "", mode, task_id, ttl_ms, payload)
    reply = iter(BULK_SCRIPT(channel.client, [], args))
    owners: list[str] = []
    for _list_key, _wake_key, records in groups:
        if not any(lock for lock, *_ in records):
            owners += [""] * len(records)
            continue
        for _ in records:
            item = next(reply)
            owners.append(item.decode() if isinstance(item, bytes) else str(item))
    return owners


# --- cancel records -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Found:
    """A message found by a cancel filter."""

    task_id: str
    name: str
    queue: str
    where: str  # "queued", "delayed" or "reserved"
    sent_at: float | None


class CancelStore:
    """The durable cancel records in the broker's Redis, and the filter that finds messages."""

    def __init__(
        self, client: redis.Redis, keys: Keys, keyprefix: str = "", retention_s: float = 604800.0
    ) -> None:
        self.client = client
        self.keys = keys
        self.keyprefix = keyprefix
        self.retention_s = retention_s

    def _key(self, name: str) -> str:
        return self.keyprefix + name

    def cancel(
        self,
        task_ids: Iterable[str],
        *,
        by: str,
        terminate: bool = False,
        grace_s: float = 0.0,
        now: float | None = None,
    ) -> int:
        """Record ``task_ids`` as cancelled; returns how many were not cancelled before."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(str(task_id) for task_id in task_ids))
        if not ids:
            return 0
        index, info = self._key(self.keys.cancel_index()), self._key(self.keys.cancel_info())
        record = json.dumps({"at": now, "by": by, "terminate": terminate, "grace_s": grace_s})
        added = 0
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            pipe = self.client.pipeline(transaction=True)
            # NX: a second cancel keeps the first record's time (and a task's outcome).
            pipe.zadd(index, dict.fromkeys(chunk, now), nx=True)
            for task_id in chunk:
                pipe.hsetnx(info, task_id, record)
            if terminate:
                # A later --terminate upgrades an earlier cooperative cancel.
                for task_id in chunk:
                    pipe.zadd(index, {task_id: now}, xx=True)
                    pipe.hset(info, task_id, record)
            added += int(pipe.execute()[0])
        self.prune(now)
        return added

    def prune(self, now: float) -> int:
        """Drop records older than the retention."""
        index, info = self._key(self.keys.cancel_index()), self._key(self.keys.cancel_info())
        old = self.client.zrangebyscore(index, "-inf", now - self.retention_s, start=0, num=10000)
        if old:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(index, *old)
            pipe.hdel(info, *old)
            pipe.execute()
        return len(old)

    def is_cancelled(self, task_id: str) -> bool:
        return self.client.zscore(self._key(self.keys.cancel_index()), task_id) is not None

    def count(self) -> int:
        return int(self.client.zcard(self._key(self.keys.cancel_index())))

    def record(self, task_id: str) -> dict[str, Any] | None:
        """Who cancelled ``task_id``, when, and what became of it; None: not cancelled."""
        raw = self.client.hget(self._key(self.keys.cancel_info()), task_id)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def set_outcome(self, task_id: str, outcome: str, **extra: Any) -> None:
        """Note what became of a cancelled task (skipped, stopped, terminated)."""
        record = self.record(task_id) or {}
        record.update(extra, outcome=outcome, outcome_at=time.time())
        self.client.hset(self._key(self.keys.cancel_info()), task_id, json.dumps(record))

    def since(self, after: float) -> list[tuple[str, float]]:
        """Records made after ``after`` (s since epoch), oldest first."""
        rows: Any = self.client.zrangebyscore(
            self._key(self.keys.cancel_index()), f"({after!r}", "+inf", withscores=True
        )
        return [(k.decode() if isinstance(k, bytes) else str(k), float(s)) for k, s in rows]

    # --- the bulk filter ---------------------------------------------------------------------
    def find(
        self,
        queues: Iterable[str],
        list_names: dict[str, list[str]],
        *,
        name: str = "*",
        queue: str | None = None,
        older_than_s: float | None = None,
        unacked_key: str = "unacked",
        now: float | None = None,
    ) -> list[Found]:
        """Messages waiting (queued, delayed) or reserved whose task name matches ``name`` (a
        shell glob), on ``queue`` when given, sent more than ``older_than_s`` ago when given
        (messages without a send time then do not match). ``list_names``: each queue's
        priority sub-lists, as the transport names them (no prefix)."""
        now = time.time() if now is None else now
        found: dict[str, Found] = {}

        def consider(raw: Any, where: str, q: str) -> None:
            try:
                message = json.loads(raw)
                headers = message.get("headers") or {}
                task_id, task_name = headers["id"], headers["task"]
            except (ValueError, KeyError, TypeError, AttributeError):
                return
            if not fnmatch.fnmatchcase(str(task_name), name):
                return
            sent = headers.get(HEADER_SENT_AT)
            sent_at = float(sent) if isinstance(sent, int | float) else None
            if older_than_s is not None and (sent_at is None or now - sent_at < older_than_s):
                return
            found.setdefault(str(task_id), Found(str(task_id), str(task_name), q, where, sent_at))

        wanted = [q for q in queues if queue is None or q == queue]
        for q in wanted:
            for list_name in list_names.get(q, [q]):
                for raw in _scan_list(self.client, self._key(list_name)):
                    consider(raw, "queued", q)
            zset = self._key(self.keys.delayed(q))
            for member in _scan_zset(self.client, zset):
                text = member.decode() if isinstance(member, bytes) else str(member)
                consider(text.partition(":")[2], "delayed", q)
        for _, value in self.client.hscan_iter(self._key(unacked_key), count=1000):
            try:
                payload, _exchange, routing_key = json.loads(value)
            except (ValueError, TypeError):
                continue
            if queue is None or routing_key == queue:
                consider(json.dumps(payload), "reserved", str(routing_key))
        return list(found.values())


def _scan_list(client: redis.Redis, key: str, step: int = 1000) -> Iterator[Any]:
    start = 0
    while True:
        chunk = client.lrange(key, start, start + step - 1)
        yield from chunk
        if len(chunk) < step:
            return
        start += step


def _scan_zset(client: redis.Redis, key: str, step: int = 1000) -> Iterator[Any]:
    start = 0
    while True:
        chunk = client.zrange(key, start, start + step - 1)
        yield from chunk
        if len(chunk) < step:
            return
        start += step


def counts(client: redis.Redis, keys: Keys, keyprefix: str = "") -> dict[tuple[str, str], int]:
    """(task name, event) -> count of job-control outcomes, for /metrics."""
    raw = client.hgetall(keyprefix + keys.jobs_counts())
    out: dict[tuple[str, str], int] = {}
    for field, value in raw.items():
        text = field.decode() if isinstance(field, bytes) else str(field)
        task, _, event = text.partition("\x1f")
        out[(task, event)] = int(value)
    return out
