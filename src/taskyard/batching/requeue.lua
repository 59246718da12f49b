-- Put a dead batch back in flight with fresh attempts. Atomic: it leaves the dead letters and
-- gains a lease (and counts as pending again) in one step, so a requeue racing another requeue
-- or a purge happens once. KEYS[1] dead index; ARGV: prefix, id, lease_ms.
-- Returns {id, group, size} or an empty list when the batch is not dead.

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
