-- Moves due members of every registered delayed set onto their queue's list, oldest due first.
-- Atomic: one script, so a member is removed and pushed together, and many movers running at
-- once (every worker, beat) move each message exactly once.
-- KEYS[1] = the registry SET of queue names (in full, kombu's global_keyprefix applied).
-- ARGV[1] = kombu global_keyprefix, ARGV[2] = delayed-set prefix ("<namespace>:delayed:"),
-- ARGV[3] = priority separator, ARGV[4] = most members to move, ARGV[5] = now (ms) or "" for
-- the Redis clock, ARGV[6] = wake-stream prefix ("<namespace>:wake:", "" for none), ARGV[7] =
-- wake-stream length cap. A push that makes a list non-empty adds a wake entry to its queue's
-- stream in the same step, as taskyard's transport's own publish does, so workers idle on
-- XREAD take the message at once. Returns {moved, now (ms), earliest score left or false}.

-- "now" stays a string: a Lua number of 13 digits would be passed to Redis as 1.7e+12.
local now = ARGV[5]
if now == '' then
  local t = redis.call('TIME')
  now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end
local prefix, zprefix, sep = ARGV[1], ARGV[2], ARGV[3]
local limit = tonumber(ARGV[4])
local moved = 0
local earliest = false
for _, queue in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local zkey = prefix .. zprefix .. queue
  if moved < limit then
    local due = redis.call('ZRANGEBYSCORE', zkey, '-inf', now, 'LIMIT', 0, limit - moved)
    local woken = false
    for _, member in ipairs(due) do
      local cut = string.find(member, ':', 1, true)
      local step = string.sub(member, 1, cut - 1)
      local target = prefix .. queue
      if step ~= '0' then target = target .. sep .. step end
      if redis.call('LPUSH', target, string.sub(member, cut + 1)) == 1 and not woken
          and ARGV[6] ~= '' then
        redis.call('XADD', prefix .. ARGV[6] .. queue, 'MAXLEN', '~', ARGV[7], '*', 'w', '1')
        woken = true
      end
    end
    if #due > 0 then
      redis.call('ZREM', zkey, unpack(due))
      moved = moved + #due
    end
  end
  local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  if first[2] and (not earliest or tonumber(first[2]) < tonumber(earliest)) then
    earliest = first[2]
  end
end
return {moved, now, earliest}
