-- Claim every buffer whose oldest item is at least max_wait_ms old, and re-arm expired leases.
-- Atomic per batch name: a group is claimed whole (the items behind an aged head are flushed
-- early rather than late) and removed from the age index in the same step, and an expired lease
-- is pushed forward before its batch is republished, so any number of reapers running at once
-- claim each item once and republish each expired batch once per lease.
-- KEYS[1] oldest index; ARGV: prefix, max_wait_ms, batch_size, lease_ms, limit, reason,
-- leases (1: also re-arm expired leases). Returns {{id, group, size}...}, {{id, group, size}...}
-- (claimed, republished).

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
