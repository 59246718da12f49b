-- Delete a dead batch for good. Atomic with respect to REQUEUE (same index check).
-- KEYS[1] dead index; ARGV: prefix, id. Returns the number of items deleted, -1 if not dead.

local id = ARGV[2]
if not redis.call('ZSCORE', KEYS[1], id) then return -1 end
local items = prefix .. 'items:' .. id
local group = redis.call('HGET', prefix .. 'meta:' .. id, 'group') or ''
local n = redis.call('LLEN', items)
redis.call('DEL', items, prefix .. 'meta:' .. id)
redis.call('ZREM', KEYS[1], id)
stat('purged_items', group, n)
return n
