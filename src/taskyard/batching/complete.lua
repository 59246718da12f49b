-- Finish a batch that succeeded. Atomic: delete items, meta and lease, and count, so a
-- duplicate completion (two holders after a lease expiry) counts the items once.
-- KEYS[1] meta; ARGV: prefix, id. Returns the number of items, or -1 if already finished.

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
