-- Renew the leases of held deliveries: their unacked_index score and, through the RENEW hooks,
-- what admit took for them (flow control's slots are leased like the reservation). XX: never
-- re-adds a tag acknowledged or restored meanwhile. Built from the same fragments as fetch.lua.
-- Atomic per call. KEYS: unacked ZSET. ARGV: key prefix, now (s), tags. Reply: the number of tags.

local now = ARGV[2]
local now_s = tonumber(now)
for t = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[t])
  for _, hook in ipairs(RENEW) do hook(ARGV[t], now_s) end
end
return #ARGV - 2
