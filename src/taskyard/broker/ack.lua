-- Remove acknowledged tags from the unacked HASH and index, each through release() (the timer
-- fallback of the fetch script's own ack carrying; built from the same fragments, see
-- fetch.lua). Atomic per call, like kombu's ZREM+HDEL pipeline, and with whatever release()
-- frees. KEYS: HASH, ZSET. ARGV: key prefix, tags. Reply: the number of tags.

local i = 2
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  for t = i, j do release(ARGV[t]) end
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  i = j + 1
end
return #ARGV - 1
