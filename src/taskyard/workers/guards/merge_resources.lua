-- Merges per-task deltas into the JSON values of one hash. Atomic: the whole merge is one script,
-- so concurrent flushes from many processes never lose an update.
-- KEYS[1] = task_resources hash; ARGV[1] = now; then pairs (task name, JSON {"sum":{},"max":{}}).

local now = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  local name = ARGV[i]
  local delta = cjson.decode(ARGV[i + 1])
  local raw = redis.call('HGET', KEYS[1], name)
  local cur = {}
  if raw then cur = cjson.decode(raw) end
  for k, v in pairs(delta['sum']) do cur[k] = (tonumber(cur[k]) or 0) + v end
  for k, v in pairs(delta['max']) do
    local old = tonumber(cur[k])
    if old == nil or v > old then cur[k] = v end
  end
  cur['updated_at'] = now
  redis.call('HSET', KEYS[1], name, cjson.encode(cur))
end
return #ARGV
