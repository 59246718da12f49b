-- Extend the lease of a running batch. Atomic: only while this worker still owns it.
-- KEYS[1] meta; ARGV: prefix, id, token, lease_ms. Returns 1 if renewed.

local meta = KEYS[1]
if redis.call('HGET', meta, 'owner') ~= ARGV[3] or redis.call('HGET', meta, 'state') ~= 'running'
then return 0 end
redis.call('ZADD', prefix .. 'leases', 'XX', now_ms() + tonumber(ARGV[4]), ARGV[2])
return 1
