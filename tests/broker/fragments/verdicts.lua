-- Test fragment (tests/broker/test_fetch_hooks.py): logs every admit and release call under
-- the key prefix and decides by task name: 'hold.*' is held, 'drop.*' dropped, 'odd.*' gets a
-- verdict the body does not know, anything else goes on to the default admit.
local base_admit, base_release = admit, release

admit = function(msg, item, qindex, now)
  local name = msg['headers']['task']
  redis.call('RPUSH', prefix .. 'test:admitted', name .. '|' .. qindex .. '|' .. type(now))
  local kind = string.match(name, '^(%a+)%.')
  if kind == 'hold' or kind == 'drop' then return kind end
  if kind == 'odd' then return 'later, maybe' end
  return base_admit(msg, item, qindex, now)
end

release = function(tag)
  redis.call('RPUSH', prefix .. 'test:released', tag .. '|' .. redis.call('HEXISTS', KEYS[1], tag))
  base_release(tag)
end
