-- Apply pending acknowledgements, then pop up to ``n`` messages, each from the first non-empty
-- list in consumption order, and record each in the unacked HASH and index.
-- Atomic: a message leaves its list and enters the unacked records in one step, so a worker
-- killed at any point leaves every message either queued or recorded (kombu's sweep restores
-- recorded ones); the acks are applied in the same call. When every list is empty the reply
-- carries the last id of each wake stream, read in the same atomic step, so an XREAD from those
-- ids sees every wake entry a producer adds afterwards (no lost wake-up).
-- KEYS: unacked HASH, unacked ZSET, quarantine LIST, the L lists in order, the wake streams.
-- ARGV: now (s), L, n, record (1: record unacked, 0: no-ack consumer), A, A acked tags.
-- Reply: {1, i1, msg1, i2, msg2, ...} (list index, 1-based, and raw message), or
-- {0, id1, id2, ...} (wake stream ids) when nothing was popped, or {2, count} when only
-- undecodable messages were found (moved to the quarantine list, never dropped).

local now = ARGV[1]
local nlists = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local record = ARGV[4] == '1'
local nacks = tonumber(ARGV[5])
local i = 6
while nacks > 0 do
  local j = math.min(i + 999, i + nacks - 1)
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  nacks = nacks - (j - i + 1)
  i = j + 1
end
local out = {1}
local quarantined = 0
-- Lists before k were found empty and nothing else runs during the script, so each further
-- pop stays at k: strict order holds across the whole reply.
local k = 4
local last = 3 + nlists
while k <= last and (#out - 1) / 2 < want do
  local item = redis.call('RPOP', KEYS[k])
  if not item then
    k = k + 1
  else
    local ok, msg = pcall(cjson.decode, item)
    local tag, info
    if ok and type(msg) == 'table' and type(msg['properties']) == 'table' then
      tag = msg['properties']['delivery_tag']
      info = msg['properties']['delivery_info']
    end
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      -- Not a kombu message: kept for an operator, never lost, never redelivered in a loop.
      redis.call('LPUSH', KEYS[3], item)
      redis.call('LTRIM', KEYS[3], 0, 9999)
      quarantined = quarantined + 1
    else
      if record then
        redis.call('ZADD', KEYS[2], now, tag)
        redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
                   .. ',' .. cjson.encode(info['routing_key']) .. ']')
      end
      out[#out + 1] = k - 3
      out[#out + 1] = item
    end
  end
end
if #out > 1 then return out end
if quarantined > 0 then return {2, quarantined} end
local ids = {0}
for s = last + 1, #KEYS do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)
  ids[#ids + 1] = tail[1] and tail[1][1] or '0-0'
end
return ids
