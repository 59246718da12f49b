-- Remove acknowledged tags from the unacked HASH and index (the timer fallback of FETCH's own
-- ack carrying). Atomic per call, like kombu's ZREM+HDEL pipeline. KEYS: HASH, ZSET. ARGV: tags.

local i = 1
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
return #ARGV
