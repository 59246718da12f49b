-- Publish one message of a unique, throttled or debounced task (taskyard.broker.control.jobs).
-- Atomic: the lock check, the lock and the push are one step, so of many producers calling at
-- once exactly one publishes and every other learns the owner's id.
-- KEYS: lock, target (the queue's list, or its delayed ZSET), wake stream (list) or the
-- delayed registry SET (delayed), counts HASH.
-- ARGV: mode (queued|active|throttle|debounce), task id, payload (message JSON, or the delayed
-- member), lock TTL (ms), wake cap, kind (list|delayed), score (delayed: due, ms), queue name,
-- task name, cancel-info HASH (debounce: records the superseded message).
-- Reply: {1, superseded id or false} published; {0, owner id} not published.
local mode, id, lock = ARGV[1], ARGV[2], KEYS[1]
local superseded = false
if mode == 'debounce' then
  local old = redis.call('HMGET', lock, 'id', 'member')
  if old[1] and old[2] and redis.call('ZREM', KEYS[2], old[2]) == 1 then
    superseded = old[1]
    redis.call('HSET', ARGV[10], old[1], cjson.encode({
      at = tonumber(ARGV[7]) / 1000, by = 'debounce', outcome = 'superseded',
      replaced_by = id, name = ARGV[9]}))
    redis.call('HINCRBY', KEYS[4], ARGV[9] .. '\31debounced', 1)
  end
  redis.call('DEL', lock)
  redis.call('HSET', lock, 'id', id, 'member', ARGV[3])
  redis.call('PEXPIRE', lock, ARGV[4])
else
  local owner = redis.call('GET', lock)
  -- The owner itself may publish again (Celery's retry sends the same id).
  if owner and owner ~= id then
    redis.call('HINCRBY', KEYS[4], ARGV[9] .. '\31' .. (mode == 'throttle' and 'throttled'
      or 'deduplicated'), 1)
    return {0, owner}
  end
  redis.call('SET', lock, id, 'PX', ARGV[4])
end
if ARGV[6] == 'delayed' then
  redis.call('SADD', KEYS[3], ARGV[8])
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[3])
elseif redis.call('LPUSH', KEYS[2], ARGV[3]) == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'w', '1')
end
return {1, superseded}
