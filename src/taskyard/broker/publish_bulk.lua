-- Publish a chunk of task messages (delay_many/apply_many, taskyard.broker.control.jobs).
-- Atomic per chunk: every message of the chunk is pushed (or deduplicated) in one step.
-- Key names travel in ARGV (a chunk may span several priority lists); like the fetch, this
-- transport does not run on Redis Cluster.
-- ARGV: wake cap, counts HASH, task name, then groups: list key, wake key, n, locked (0|1), and
-- n records: (lock key or '', mode, task id, lock TTL ms, message JSON) when locked, else the
-- n messages alone.
-- Reply: one entry per message of the locked groups, in order: '' published, else the owner id
-- (deduplicated); the messages of unlocked groups are all published and have no entry.
local cap, counts, name = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local i = 4
while i <= #ARGV do
  local list, wake, n, locked = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3] == '1'
  i = i + 4
  local batch = {}
  local was = redis.call('LLEN', list)
  if not locked then
    for j = i, i + n - 1, 1000 do
      redis.call('LPUSH', list, unpack(ARGV, j, math.min(j + 999, i + n - 1)))
    end
    i = i + n
  end
  for _ = 1, (locked and n or 0) do
    local lock = ARGV[i]
    local owner = false
    if lock ~= '' then
      owner = redis.call('GET', lock)
      if owner == ARGV[i + 2] then owner = false end
      if owner then
        redis.call('HINCRBY', counts, name .. '\31' .. (ARGV[i + 1] == 'throttle'
          and 'throttled' or 'deduplicated'), 1)
      else
        redis.call('SET', lock, ARGV[i + 2], 'PX', ARGV[i + 3])
      end
    end
    if owner then
      out[#out + 1] = owner
    else
      out[#out + 1] = ''
      batch[#batch + 1] = ARGV[i + 4]
      if #batch == 1000 then
        redis.call('LPUSH', list, unpack(batch))
        batch = {}
      end
    end
    i = i + 5
  end
  if #batch > 0 then redis.call('LPUSH', list, unpack(batch)) end
  if was == 0 and redis.call('LLEN', list) > 0 then
    redis.call('XADD', wake, 'MAXLEN', '~', cap, '*', 'w', '1')
  end
end
return out
