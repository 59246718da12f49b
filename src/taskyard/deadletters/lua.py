"""The Lua scripts of the Redis dead-letter store; each states what it makes atomic.

Every key shares the hash tag ``{<namespace>:dead}`` (``keys.py``), so the scripts also run on
Redis Cluster: ``KEYS[1]`` is the entries hash (it routes the call) and the index keys are built
from the prefix in ``ARGV[1]``. An entry is JSON; the scripts read only the indexed fields and
the merge fields (first_at, times) of it.
"""

from __future__ import annotations

_PRELUDE = """
local prefix = ARGV[1]
local entries = KEYS[1]
local index = prefix .. 'index'
local counts = prefix .. 'counts'
local INDEXED = {'name', 'queue', 'reason', 'exception_type', 'state'}
local function count_field(e)
  return tostring(e.queue or '') .. '\\31' .. tostring(e.name or '') .. '\\31' ..
         tostring(e.reason or '')
end
local function unindex(id, e)
  redis.call('ZREM', index, id)
  for _, f in ipairs(INDEXED) do
    redis.call('ZREM', prefix .. 'by:' .. f .. ':' .. tostring(e[f] or ''), id)
  end
  if e.state == 'dead' then
    local left = redis.call('HINCRBY', counts, count_field(e), -1)
    if left <= 0 then redis.call('HDEL', counts, count_field(e)) end
  end
end
local function add_index(id, e)
  local score = tonumber(e.last_at) or 0
  redis.call('ZADD', index, score, id)
  for _, f in ipairs(INDEXED) do
    redis.call('ZADD', prefix .. 'by:' .. f .. ':' .. tostring(e[f] or ''), score, id)
  end
  if e.state == 'dead' then redis.call('HINCRBY', counts, count_field(e), 1) end
end
local function remove(id)
  local raw = redis.call('HGET', entries, id)
  if raw then
    unindex(id, cjson.decode(raw))
    redis.call('HDEL', entries, id)
    return 1
  end
  redis.call('ZREM', index, id)
  return 0
end
-- Drop entries older than cutoff, then the oldest beyond max_entries; returns how many.
local function trim(cutoff, max_entries)
  local n = 0
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. cutoff, 'LIMIT', 0, 1000)
  for _, id in ipairs(old) do
    n = n + remove(id)
  end
  local excess = redis.call('ZCARD', index) - max_entries
  if excess > 0 then
    for _, id in ipairs(redis.call('ZRANGE', index, 0, math.min(excess, 1000) - 1)) do
      n = n + remove(id)
    end
  end
  return n
end
"""

#: Record one entry, merging with an earlier entry of the same id (first_at kept, times + 1),
#: then apply the count and age bounds. Atomic: the entry, its indexes and the gauge counts
#: change together, so a concurrent search never sees an entry its indexes do not list.
#: KEYS[1] entries; ARGV: prefix, id, entry JSON, max_entries, cutoff (s). Returns trimmed.
RECORD = (
    _PRELUDE
    + """
local id = ARGV[2]
local entry = cjson.decode(ARGV[3])
local old_raw = redis.call('HGET', entries, id)
if old_raw then
  local old = cjson.decode(old_raw)
  unindex(id, old)
  if tonumber(old.first_at) and tonumber(old.first_at) < tonumber(entry.first_at) then
    entry.first_at = old.first_at
  end
  entry.times = (tonumber(old.times) or 1) + 1
end
redis.call('HSET', entries, id, cjson.encode(entry))
add_index(id, entry)
return trim(tonumber(ARGV[5]), tonumber(ARGV[4]))
"""
)

#: Mark an entry replayed (it leaves the "dead" state, its indexes and the gauge). Atomic with
#: respect to RECORD, DELETE and another replay: only an entry in state "dead" is marked, so
#: two operators replaying at once send it once. KEYS[1] entries; ARGV: prefix, id, new task
#: id, time (s). Returns 1 when marked, 0 when the entry is gone or not dead.
MARK_REPLAYED = (
    _PRELUDE
    + """
local id = ARGV[2]
local raw = redis.call('HGET', entries, id)
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry.state ~= 'dead' then return 0 end
unindex(id, entry)
entry.state = 'replayed'
entry.replayed_as = ARGV[3]
entry.replayed_at = tonumber(ARGV[4])
redis.call('HSET', entries, id, cjson.encode(entry))
add_index(id, entry)
return 1
"""
)

#: Delete entries by id. Atomic per call: entries, indexes and gauge counts together.
#: KEYS[1] entries; ARGV: prefix, id... Returns how many existed.
DELETE = (
    _PRELUDE
    + """
local n = 0
for i = 2, #ARGV do n = n + remove(ARGV[i]) end
return n
"""
)

#: Apply the bounds alone (the stats collection runs it, so an idle store still ages out).
#: KEYS[1] entries; ARGV: prefix, max_entries, cutoff. Returns how many were dropped.
TRIM = (
    _PRELUDE
    + """
return trim(tonumber(ARGV[3]), tonumber(ARGV[2]))
"""
)
