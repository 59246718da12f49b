-- Flow control at reservation (issue 19, docs/flow.md): pauses, cluster-wide rate and
-- concurrency limits, fair share between partition values. Plugs into the hook lists of
-- hooks.lua; names its keys from prefix .. 'flow:' (keys.py, "flow control").
--
-- State read once per fetch, at its first hook call: the rules HASH (flow:rules). Empty: nothing is configured and
-- every hook returns at once (one HGETALL of a missing key per fetch). Fields:
--   t:<task>          "<n>|<period s>|<concurrency>|<partitioned 0/1>|<burst>" (0: no such limit)
--   p:<lua pattern>   "1": tasks whose name matches are paused (anchored pattern of a glob)
--   l:<list key>      "1": a list of a paused queue (not popped at all)
--   r:<list key>      "1": the list has held buckets (its ring is not empty)
--   w:<task>|<value>  fair-share weight (integer >= 1) of one partition value
--   lease             the reservation lease (s): a slot not renewed for that long is free
-- A message of a task named by t: or p: is moved from its list into its bucket (a LIST per
-- list, task and partition value) and reported as 'drop' (flow keeps it); buckets are served
-- round-robin from the list's ring (ZSET bucket -> virtual time) when the scan reaches the list,
-- each admitted by its rules. Order holds within a bucket; a held bucket stops neither the
-- others nor the list. Past MOVE_BUDGET moves in one call, messages are held in place instead.

local FP = prefix .. 'flow:'
local F_ON = false
local F_TASK, F_PAUSE, F_LIST, F_RING, F_WEIGHT = {}, {}, {}, {}, {}
local F_LEASE = 3600
local F_MATCH = {}        -- task name -> {rule or false, paused} or false (per call)
local F_SCOPE = {}        -- scope -> {count, tat, dirty, per} (per call)
local F_RETRY = nil       -- soonest time (s) a rate-held bucket may run
local F_TAGS = nil        -- whether the tags HASH exists (per call)
local F_MOVES = 0
local F_STARTED = {}      -- task -> reservations this call ("started in the last minute")
local MOVE_BUDGET = 4096

local F_LOADED = false

local function f_load()
  local flat = redis.call('HGETALL', FP .. 'rules')
  for j = 1, #flat, 2 do
    F_ON = true
    local f, v = flat[j], flat[j + 1]
    local kind, name = string.sub(f, 1, 1), string.sub(f, 3)
    if f == 'lease' then F_LEASE = tonumber(v) or F_LEASE
    elseif kind == 't' then
      local n, per, conc, part, burst =
        string.match(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
      F_TASK[name] = {n = tonumber(n) or 0, per = tonumber(per) or 1,
                      conc = tonumber(conc) or 0, part = part == '1',
                      burst = tonumber(burst) or 1}
    elseif kind == 'p' then F_PAUSE[#F_PAUSE + 1] = name
    elseif kind == 'l' then F_LIST[name] = true
    elseif kind == 'r' then F_RING[name] = true
    elseif kind == 'w' then F_WEIGHT[name] = tonumber(v) or 1
    end
  end
end

-- Whether anything is configured; the rules are read at the first call (not by ack scripts).
local function f_on()
  if not F_LOADED then
    F_LOADED = true
    f_load()
  end
  return F_ON
end

-- {rule or false, paused} for a task flow control governs, else nil.
local function f_match(task)
  local m = F_MATCH[task]
  if m == nil then
    local paused = false
    for _, pat in ipairs(F_PAUSE) do
      if string.find(task, pat) then paused = true break end
    end
    local rule = F_TASK[task]
    if rule or paused then m = {rule or false, paused} else m = false end
    F_MATCH[task] = m
  end
  return m or nil
end

local function f_scope_state(scope, rule, now)
  local s = F_SCOPE[scope]
  if s then return s end
  s = {count = 0, tat = 0, dirty = false, per = rule.per}
  if rule.conc > 0 then
    local slots = FP .. 's:' .. scope
    -- Slots whose lease ran out: their holder (a dead worker) stopped renewing them.
    local stale = redis.call('ZRANGEBYSCORE', slots, '-inf', now - F_LEASE)
    for j = 1, #stale, 1000 do
      local last = math.min(j + 999, #stale)
      redis.call('ZREM', slots, unpack(stale, j, last))
      redis.call('HDEL', FP .. 'tags', unpack(stale, j, last))
    end
    s.count = redis.call('ZCARD', slots)
  end
  if rule.n > 0 then
    s.tat = tonumber(redis.call('GET', FP .. 'r:' .. scope)) or 0
  end
  F_SCOPE[scope] = s
  return s
end

-- 'run' (with the scope to charge) or 'hold', for the next message of one bucket.
local function f_admit_bucket(task, value, now)
  local m = f_match(task)
  if not m then return 'run' end
  if m[2] then return 'hold' end
  local rule = m[1]
  if not rule or (rule.conc == 0 and rule.n == 0) then return 'run' end
  local scope = task
  if rule.part then scope = task .. '\0' .. value end
  local s = f_scope_state(scope, rule, now)
  if rule.conc > 0 and s.count >= rule.conc then return 'hold' end
  if rule.n > 0 then
    local t = rule.per / rule.n
    local tat = math.max(s.tat, now)
    -- GCRA: up to burst reservations at once, then one every t seconds.
    if tat - now > (rule.burst - 1) * t then
      local at = tat - (rule.burst - 1) * t
      if F_RETRY == nil or at < F_RETRY then F_RETRY = at end
      return 'hold'
    end
  end
  return 'run', scope, rule, s
end

local function f_charge(scope, rule, s, tag, now)
  if rule.conc > 0 then
    s.count = s.count + 1
    redis.call('ZADD', FP .. 's:' .. scope, now, tag)
    redis.call('HSET', FP .. 'tags', tag, scope)
  end
  if rule.n > 0 then
    s.tat = math.max(s.tat, now) + rule.per / rule.n
    s.dirty = true
  end
end

local function f_bucket_key(qindex, bucket)
  return FP .. 'h:' .. KEYS[3 + qindex] .. '\0' .. bucket
end

-- Messages of governed tasks go to their bucket: 'drop' (flow keeps them, in order).
ADMIT_LAST[#ADMIT_LAST + 1] = function(msg, item, qindex, now)
  if not f_on() then return 'run' end
  local headers = msg['headers']
  if type(headers) ~= 'table' then return 'run' end
  local task = headers['task']
  if type(task) ~= 'string' or not f_match(task) then return 'run' end
  if F_MOVES >= MOVE_BUDGET then return 'hold' end
  local value = headers['taskyard_partition']
  if type(value) ~= 'string' then value = '' end
  local bucket = task .. '\0' .. value
  local list = KEYS[3 + qindex]
  if redis.call('LPUSH', f_bucket_key(qindex, bucket), item) == 1 then
    local ring = FP .. 'ring:' .. list
    local head = redis.call('ZRANGE', ring, 0, 0, 'WITHSCORES')
    -- A new bucket joins at the ring's current turn: no credit for having been idle.
    redis.call('ZADD', ring, 'NX', head[2] or 0, bucket)
    if not F_RING[list] then
      F_RING[list] = true
      redis.call('HSET', FP .. 'rules', 'r:' .. list, '1')
    end
  end
  F_MOVES = F_MOVES + 1
  return 'drop'
end

SKIP[#SKIP + 1] = function(qindex)
  return f_on() and F_LIST[KEYS[3 + qindex]] == true
end

-- Serve up to need messages from the buckets of one list, round-robin by virtual time. On
-- entering a list that still has messages, at most half of need: the rest of the call pops the
-- list, so later arrivals (another tenant's) reach their buckets and get their turn in this
-- same call instead of waiting behind a large bucket.
SERVE[#SERVE + 1] = function(qindex, need, deliver, now, leaving)
  local list = KEYS[3 + qindex]
  if not f_on() or not F_RING[list] or need <= 0 then return 0 end
  if not leaving and redis.call('LLEN', list) > 0 then need = math.ceil(need / 2) end
  local ring = FP .. 'ring:' .. list
  local flat = redis.call('ZRANGE', ring, 0, 63, 'WITHSCORES')
  local cands = {}
  local top = 0
  for j = 1, #flat, 2 do
    local bucket = flat[j]
    local task, value = string.match(bucket, '^(.-)%z(.*)$')
    task = task or bucket
    value = value or ''
    local score = tonumber(flat[j + 1])
    if score > top then top = score end
    cands[#cands + 1] = {bucket = bucket, task = task, value = value, score = score,
                         w = F_WEIGHT[task .. '|' .. value] or 1, live = true, served = 0,
                         held = false, empty = false}
  end
  local served = 0
  local progress = true
  while progress and served < need do
    progress = false
    for _, c in ipairs(cands) do
      if c.live then
        local n = 0
        while n < c.w and served < need do
          local verdict, scope, rule, s = f_admit_bucket(c.task, c.value, now)
          if verdict ~= 'run' then c.live = false c.held = true break end
          local item = redis.call('RPOP', f_bucket_key(qindex, c.bucket))
          if not item then c.live = false c.empty = true break end
          local ok, msg = pcall(cjson.decode, item)
          local tag = deliver(qindex, item, ok and msg or nil)
          if tag then
            if scope then f_charge(scope, rule, s, tag, now) end
            F_STARTED[c.task] = (F_STARTED[c.task] or 0) + 1
          end
          n = n + 1
          served = served + 1
          c.served = c.served + 1
          progress = true
        end
        if served >= need then break end
      end
    end
  end
  for _, c in ipairs(cands) do
    if c.empty then
      redis.call('ZREM', ring, c.bucket)
    elseif c.served > 0 then
      redis.call('ZADD', ring, 'XX', c.score + c.served / c.w, c.bucket)
    elseif c.held and c.score < top then
      -- Could not run: behind the buckets looked at, so those further on get their turn.
      redis.call('ZADD', ring, 'XX', top, c.bucket)
    end
  end
  if redis.call('ZCARD', ring) == 0 then
    F_RING[list] = nil
    redis.call('HDEL', FP .. 'rules', 'r:' .. list)
  end
  return served
end

-- Writes the rate state and start counters; the retry time (ms from now) of rate holds.
FINISH[#FINISH + 1] = function(now)
  if not F_LOADED or not F_ON then return 0 end
  for scope, s in pairs(F_SCOPE) do
    if s.dirty then
      local ttl = math.ceil((s.tat - now + s.per) * 1000)
      redis.call('SET', FP .. 'r:' .. scope, tostring(s.tat), 'PX', math.max(ttl, 1000))
    end
  end
  local slot = tostring(math.floor(now / 10))
  for task, n in pairs(F_STARTED) do
    local key = FP .. 'n:' .. task
    redis.call('HINCRBY', key, slot, n)
    redis.call('EXPIRE', key, 130)
  end
  if F_RETRY then return math.max(1, math.ceil((F_RETRY - now) * 1000)) end
  return 0
end

-- A delivery's concurrency slot goes back (ack, dead letter, cancel, requeue, restore), and
-- workers waiting for a slot are woken.
RELEASE[#RELEASE + 1] = function(tag)
  if F_TAGS == nil then F_TAGS = redis.call('EXISTS', FP .. 'tags') == 1 end
  if not F_TAGS then return end
  local scope = redis.call('HGET', FP .. 'tags', tag)
  if not scope then return end
  redis.call('HDEL', FP .. 'tags', tag)
  redis.call('ZREM', FP .. 's:' .. scope, tag)
  redis.call('XADD', FP .. 'wake', 'MAXLEN', '~', 100, '*', 'w', '1')
end

-- A held delivery's slot is leased like its reservation.
RENEW[#RENEW + 1] = function(tag, now)
  if F_TAGS == nil then F_TAGS = redis.call('EXISTS', FP .. 'tags') == 1 end
  if not F_TAGS then return end
  local scope = redis.call('HGET', FP .. 'tags', tag)
  if scope then redis.call('ZADD', FP .. 's:' .. scope, 'XX', now, tag) end
end
