-- Append items to one group's buffer and claim every full batch.
-- Atomic: the max_buffered check, the append, the claims and the pending count, so concurrent
-- producers never push the name past its limit, never form a batch over batch_size, and an
-- item is always either in the buffer or in exactly one batch.
-- KEYS[1] buffer; ARGV: prefix, group, batch_size, max_buffered, lease_ms, item...
-- Returns {status, pending, id1, size1, id2, size2, ...}: status 0 accepted, 1 accepted but the
-- batch's definition (conf) is missing, -1 refused by the limit (nothing appended).

local buf = KEYS[1]
local group = ARGV[2]
local size = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local lease_ms = tonumber(ARGV[5])
local first, last = 6, #ARGV
local n = last - first + 1
local pending_key = prefix .. 'pending'
local pending = tonumber(redis.call('GET', pending_key) or '0')
if pending + n > limit then return {-1, pending} end
local now = now_ms()
local len = redis.call('LLEN', buf)
-- "fresh": the head of the buffer is an item of this call, so its arrival time is now.
local fresh = (len == 0)
if fresh then redis.call('SADD', prefix .. 'groups', group) end
local out = {0, pending + n}
local i = first
while true do
  while len >= size do
    local c = claim(group, size, 'size', now, lease_ms)
    out[#out + 1] = c[1]
    out[#out + 1] = c[3]
    len = len - c[3]
    if len == 0 then fresh = true end
  end
  if i > last then break end
  local j = math.min(i + (size - len) - 1, last, i + 999)
  redis.call('RPUSH', buf, unpack(ARGV, i, j))
  len = len + (j - i + 1)
  i = j + 1
end
redis.call('INCRBY', pending_key, n)
if len == 0 then
  redis.call('ZREM', prefix .. 'oldest', group)
elseif fresh then
  redis.call('ZADD', prefix .. 'oldest', now, group)
end
-- Tell the caller to (re)register the definition the reaper needs, e.g. after a FLUSHDB.
if redis.call('EXISTS', prefix .. 'conf') == 0 then out[1] = 1 end
return out
