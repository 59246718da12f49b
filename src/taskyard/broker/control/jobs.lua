-- Job control at reservation (taskyard.broker.control.jobs): durable cancel records and the
-- unique locks of "active"/"queued" tasks. A fragment of the fetch, ack, release and renew
-- scripts (see hooks.lua); every key is prefix .. 'jobs:<suffix>' (keys.py, "job control").
-- Its ADMIT hook runs before flow control's (ADMIT_LAST), so a cancelled message never takes a
-- concurrency slot.
local jobs_cancels = nil -- ZCARD of the cancel index, read once per script call
local jobs_held = nil -- HLEN of the tag -> lock HASH, read once per script call

local function jobs_unlock(lock, id)
  if redis.call('GET', lock) == id then redis.call('DEL', lock) end
end

local function jobs_holds()
  if jobs_held == nil then jobs_held = redis.call('HLEN', prefix .. 'jobs:tags') end
  return jobs_held > 0
end

ADMIT[#ADMIT + 1] = function(msg, item, qindex, now)
  local headers = msg['headers']
  if type(headers) ~= 'table' then return 'run' end
  local id = headers['id']
  if type(id) ~= 'string' then return 'run' end
  local unique = headers['taskyard_unique']
  if type(unique) ~= 'table' or type(unique[2]) ~= 'string' then unique = nil end
  -- The one read every fetch pays while nothing is cancelled (the set is pruned by age).
  if jobs_cancels == nil then jobs_cancels = redis.call('ZCARD', prefix .. 'jobs:cancel') end
  if jobs_cancels > 0 and redis.call('ZSCORE', prefix .. 'jobs:cancel', id) then
    -- Cancelled: consumed here and never delivered; its lock goes with it.
    if unique then jobs_unlock(prefix .. unique[2], id) end
    local raw = redis.call('HGET', prefix .. 'jobs:cancel:info', id)
    local ok, info = pcall(cjson.decode, raw or '{}')
    if not ok or type(info) ~= 'table' then info = {} end
    info['outcome'] = 'dropped'
    info['outcome_at'] = now
    info['name'] = headers['task']
    redis.call('HSET', prefix .. 'jobs:cancel:info', id, cjson.encode(info))
    redis.call('HINCRBY', prefix .. 'jobs:counts', tostring(headers['task']) .. '\31cancelled', 1)
    return 'drop'
  end
  if unique then
    local lock = prefix .. unique[2]
    if unique[1] == 'queued' then
      -- Reserved: no longer waiting, so the next call may queue another.
      jobs_unlock(lock, id)
    elseif unique[1] == 'active' then
      -- Held from now on under the reservation lease (renewed with the reservation by the
      -- live worker, RENEW below), so a SIGKILLed worker's lock frees within the lease. A lock
      -- lost meanwhile (its TTL) is taken again unless another message owns it.
      local owner = redis.call('GET', lock)
      if owner == id or not owner then
        local lease = redis.call('GET', prefix .. 'jobs:lease') or '30000'
        redis.call('SET', lock, id, 'PX', lease)
        redis.call('HSET', prefix .. 'jobs:tags', msg['properties']['delivery_tag'],
                   id .. ' ' .. lock)
        jobs_held = 1
      end
    end
  end
  return 'run'
end

RELEASE[#RELEASE + 1] = function(tag)
  if not jobs_holds() then return end
  local held = redis.call('HGET', prefix .. 'jobs:tags', tag)
  if held then
    redis.call('HDEL', prefix .. 'jobs:tags', tag)
    local cut = string.find(held, ' ', 1, true)
    jobs_unlock(string.sub(held, cut + 1), string.sub(held, 1, cut - 1))
  end
end

RENEW[#RENEW + 1] = function(tag, now)
  if not jobs_holds() then return end
  local held = redis.call('HGET', prefix .. 'jobs:tags', tag)
  if held then
    local cut = string.find(held, ' ', 1, true)
    local lock = string.sub(held, cut + 1)
    if redis.call('GET', lock) == string.sub(held, 1, cut - 1) then
      redis.call('PEXPIRE', lock, redis.call('GET', prefix .. 'jobs:lease') or '30000')
    end
  end
end
