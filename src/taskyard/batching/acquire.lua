-- Take a batch for processing. Atomic: the state check and the lease, so two deliveries of one
-- batch (a republished message beside the original) never run it at once while its holder
-- renews the lease; a delivery after the holder died takes it over and is counted as duplicate,
-- and as one crash: once a batch's runs killed their process max_deliveries times it goes to
-- the dead letters (reason "crashed") instead of running again, in the same step.
-- KEYS[1] meta; ARGV: prefix, id, token (Celery task id), lease_ms, max_deliveries (0: no bound).
-- Returns {'ok', group, attempts, deliveries, duplicate, item...}, {'crashed', crashes, items}
-- or {'gone'|'dead'|'busy'}.

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
