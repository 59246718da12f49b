-- Shared helpers of the dead-letter store scripts, the first fragment of each
-- (deadletters/store.py).
--
-- Every key shares the hash tag {<namespace>:dead} (keys.py), so the scripts also run on Redis
-- Cluster: KEYS[1] is the entries hash (it routes the call) and the index keys are built from
-- the prefix in ARGV[1]. An entry is JSON; the scripts read only the indexed fields and the
-- merge fields (first_at, times) of it.

local prefix = ARGV[1]
local entries = KEYS[1]
local index = prefix .. 'index'
local counts = prefix .. 'counts'
local INDEXED = {'name', 'queue', 'reason', 'exception_type', 'state'}
local function count_field(e)
  return tostring(e.queue or '') .. '\31' .. tostring(e.name or '') .. '\31' ..
         tostring(e.reason or '')
end
local function unindex(id, e)
  redis.call('ZREM', index, id)
  for _, f in ipairs(INDEXED) do
    redis.call('ZREM', prefix .. 'by:' .. f .. ':' .. tostring(e[f] or ''), id)
  end
  if e.state == 'dead' then
    local left = redis.call('HINCRBY', counts, count_field(e), -1)
    if left <= 0 then redis.call('HDEL', counts, count_field(e)) end
  end
end
local function add_index(id, e)
  local score = tonumber(e.last_at) or 0
  redis.call('ZADD', index, score, id)
  for _, f in ipairs(INDEXED) do
    redis.call('ZADD', prefix .. 'by:' .. f .. ':' .. tostring(e[f] or ''), score, id)
  end
  if e.state == 'dead' then redis.call('HINCRBY', counts, count_field(e), 1) end
end
local function remove(id)
  local raw = redis.call('HGET', entries, id)
  if raw then
    unindex(id, cjson.decode(raw))
    redis.call('HDEL', entries, id)
    return 1
  end
  redis.call('ZREM', index, id)
  return 0
end
-- Drop entries older than cutoff, then the oldest beyond max_entries; returns how many.
local function trim(cutoff, max_entries)
  local n = 0
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. cutoff, 'LIMIT', 0, 1000)
  for _, id in ipairs(old) do
    n = n + remove(id)
  end
  local excess = redis.call('ZCARD', index) - max_entries
  if excess > 0 then
    for _, id in ipairs(redis.call('ZRANGE', index, 0, math.min(excess, 1000) - 1)) do
      n = n + remove(id)
    end
  end
  return n
end
