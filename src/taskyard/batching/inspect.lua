-- A consistent snapshot of one batch name for inspection: per group, buffered items and the
-- oldest arrival; in-flight and dead batches and items per group; the counters.
-- KEYS[1] groups set; ARGV: prefix, limit (batches examined per index).
-- Returns {now, {group, buffered, oldest|false}..., inflight {group, state, size}...,
-- dead {group, size}..., stats flat list}.

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
