-- Job control at reservation (taskyard.broker.control.jobs): durable cancel records and the
-- unique locks of "active"/"queued" tasks. A fragment of the FETCH, ACK and RELEASE scripts
-- (taskyard.broker.lua): it appends one ADMIT and one RELEASE hook; CTX.ns is the full key
-- prefix "<kombu global_keyprefix><namespace>:", CTX.kp the kombu prefix alone, CTX.now the
-- caller's clock (s), CTX.lease_ms the reservation lease, CTX.record whether the fetch records
-- reservations (a no-ack consumer holds nothing, so it takes no lock lease).
local jobs_cancels = nil -- ZCARD of the cancel index, read once per script call
local jobs_held = nil -- HLEN of the tag -> lock HASH, read once per script call

local function jobs_unlock(lock, id)
  if redis.call('GET', lock) == id then redis.call('DEL', lock) end
end

local function jobs_count(name, event)
  redis.call('HINCRBY', CTX.ns .. 'jobs:counts', tostring(name) .. '\31' .. event, 1)
end

ADMIT[#ADMIT + 1] = function(msg, item, qindex, now)
  local headers = msg['headers']
  if type(headers) ~= 'table' then return 'run' end
  local id = headers['id']
  if type(id) ~= 'string' then return 'run' end
  local unique = headers['taskyard_unique']
  if type(unique) ~= 'table' or type(unique[2]) ~= 'string' then unique = nil end
  if jobs_cancels == nil then jobs_cancels = redis.call('ZCARD', CTX.ns .. 'jobs:cancel') end
  if jobs_cancels > 0 and redis.call('ZSCORE', CTX.ns .. 'jobs:cancel', id) then
    -- Cancelled: consumed here, never delivered; its lock goes with it.
    if unique then jobs_unlock(CTX.kp .. unique[2], id) end
    local raw = redis.call('HGET', CTX.ns .. 'jobs:cancel:info', id)
    local ok, info = pcall(cjson.decode, raw or '{}')
    if not ok or type(info) ~= 'table' then info = {} end
    info['outcome'] = 'dropped'
    info['outcome_at'] = tonumber(now)
    info['name'] = headers['task']
    redis.call('HSET', CTX.ns .. 'jobs:cancel:info', id, cjson.encode(info))
    jobs_count(headers['task'], 'cancelled')
    return 'drop'
  end
  if unique then
    local lock = CTX.kp .. unique[2]
    if unique[1] == 'queued' then
      -- Reserved: no longer waiting, so the next call may queue another.
      jobs_unlock(lock, id)
    elseif unique[1] == 'active' and CTX.record then
      -- Held from now on under the reservation's lease (renewed by the live worker), so a
      -- SIGKILLed worker's lock frees within the lease. A lock lost meanwhile (its TTL) is
      -- taken again unless another message owns it.
      local owner = redis.call('GET', lock)
      if owner == id or (not owner) then
        redis.call('SET', lock, id, 'PX', CTX.lease_ms)
        local tag = msg['properties']['delivery_tag']
        redis.call('HSET', CTX.ns .. 'jobs:tags', tag, id .. ' ' .. lock)
        jobs_held = nil
      end
    end
  end
  return 'run'
end

RELEASE[#RELEASE + 1] = function(tag)
  if jobs_held == nil then jobs_held = redis.call('HLEN', CTX.ns .. 'jobs:tags') end
  if jobs_held == 0 then return end
  local held = redis.call('HGET', CTX.ns .. 'jobs:tags', tag)
  if held then
    redis.call('HDEL', CTX.ns .. 'jobs:tags', tag)
    local cut = string.find(held, ' ', 1, true)
    jobs_unlock(string.sub(held, cut + 1), string.sub(held, 1, cut - 1))
  end
end
