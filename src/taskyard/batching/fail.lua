-- Record a failure of the whole batch or of some items (partial failure). Atomic: keep only
-- the failed items, count the rest processed, then either schedule the retry (lease pushed past
-- the backoff) or move the batch to the dead letters, so no item is lost or counted twice
-- between the two. Ignored unless the caller still owns the batch.
-- KEYS[1] meta; ARGV: prefix, id, token, max_retries, backoff_ms, lease_ms, error, partial
-- (1: the following ARGV are the 0-based indices of the failed items).
-- Returns {'retry'|'dead'|'done'|'gone'|'lost', attempts, failed items}.

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
