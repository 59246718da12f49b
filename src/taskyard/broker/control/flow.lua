-- Flow control at reservation (issue 19): pauses, cluster-wide rate and concurrency limits, fair
-- share between partition values. A fragment of the FETCH script: the main body defines
-- FP (flow key prefix), NOW, LEASE, QNAMES, the ADMIT/RELEASE lists and DELIVER(k, item, msg).
--
-- State read once per call: the rules HASH (FP .. 'rules'). Empty: nothing is configured, every
-- function below returns at once (one HGETALL of a missing key per fetch). Fields:
--   t:<task>          "<n>|<period s>|<concurrency>|<partitioned 0/1>|<burst>" (0: no such limit)
--   p:<lua pattern>   "1": tasks whose name matches are paused (anchored pattern of a glob)
--   q:<queue>         "1": the queue is paused (its lists are not popped at all)
--   r:<list key>      "1": the list has held buckets (its ring is not empty)
--   w:<task>|<value>  weight (integer >= 1) of one partition value in fair share
-- A message of a task named by t: or p: is moved from its list into its bucket (a LIST per
-- list key, task and partition value: FP .. 'h:' .. list .. '\0' .. task .. '\0' .. value);
-- buckets are served round-robin from the ring (ZSET bucket -> virtual time) of their list,
-- each admitted by its rules. Moving keeps the order within a bucket; a held bucket does not
-- stop the others or the list.

local F_ON = false
local F_TASK, F_PAUSE, F_QUEUE, F_RING, F_WEIGHT = {}, {}, {}, {}, {}
local F_MATCH = {}        -- task name -> rule or false (per call)
local F_SCOPE = {}        -- scope -> {count, tat, dirty, started}
local F_RETRY = nil       -- soonest time (s) a rate-held bucket may run
local F_MOVES = 0
local F_MOVE_BUDGET = 4096
local F_STARTED = {}      -- task -> reservations this call (for "started in the last minute")

do
  local flat = redis.call('HGETALL', FP .. 'rules')
  for j = 1, #flat, 2 do
    F_ON = true
    local f, v = flat[j], flat[j + 1]
    local kind, name = string.sub(f, 1, 1), string.sub(f, 3)
    if kind == 't' then
      local n, per, conc, part, burst = string.match(v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
      F_TASK[name] = {n = tonumber(n) or 0, per = tonumber(per) or 1, conc = tonumber(conc) or 0,
                      part = part == '1', burst = tonumber(burst) or 1}
    elseif kind == 'p' then F_PAUSE[#F_PAUSE + 1] = name
    elseif kind == 'q' then F_QUEUE[name] = true
    elseif kind == 'r' then F_RING[name] = true
    elseif kind == 'w' then F_WEIGHT[name] = tonumber(v) or 1
    end
  end
end

-- The rule of a task: {rule or false, paused}; nil when flow control ignores the task.
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

local function f_scope_state(scope, rule)
  local s = F_SCOPE[scope]
  if s then return s end
  s = {count = 0, tat = 0, dirty = false}
  if rule.conc > 0 then
    local slots = FP .. 's:' .. scope
    -- Slots whose lease ran out (a dead worker's): their holders stopped renewing them.
    local stale = redis.call('ZRANGEBYSCORE', slots, '-inf', NOW - LEASE)
    if #stale > 0 then
      for j = 1, #stale, 1000 do
        local last = math.min(j + 999, #stale)
        redis.call('ZREM', slots, unpack(stale, j, last))
        redis.call('HDEL', FP .. 'tags', unpack(stale, j, last))
      end
    end
    s.count = redis.call('ZCARD', slots)
  end
  if rule.n > 0 then
    s.tat = tonumber(redis.call('GET', FP .. 'r:' .. scope)) or 0
  end
  F_SCOPE[scope] = s
  return s
end

-- 'run' with the scope to charge, or 'hold'.
local function f_admit_bucket(task, value)
  local m = f_match(task)
  if not m then return 'run' end
  if m[2] then return 'hold' end
  local rule = m[1]
  if not rule then return 'run' end
  if rule.conc == 0 and rule.n == 0 then return 'run' end
  local scope = task
  if rule.part then scope = task .. '\0' .. value end
  local s = f_scope_state(scope, rule)
  if rule.conc > 0 and s.count >= rule.conc then return 'hold' end
  if rule.n > 0 then
    local t = rule.per / rule.n
    local tat = math.max(s.tat, NOW)
    -- GCRA: at most burst reservations at once, then one per t seconds.
    if tat - NOW > (rule.burst - 1) * t then
      local at = tat - (rule.burst - 1) * t
      if F_RETRY == nil or at < F_RETRY then F_RETRY = at end
      return 'hold'
    end
  end
  return 'run', scope, rule, s
end

local function f_charge(scope, rule, s, tag, task)
  if rule.conc > 0 then
    s.count = s.count + 1
    redis.call('ZADD', FP .. 's:' .. scope, NOW, tag)
    redis.call('HSET', FP .. 'tags', tag, scope)
  end
  if rule.n > 0 then
    s.tat = math.max(s.tat, NOW) + rule.per / rule.n
    s.dirty = true
    s.per = rule.per
  end
  F_STARTED[task] = (F_STARTED[task] or 0) + 1
end

local function f_bucket_key(k, bucket)
  return FP .. 'h:' .. KEYS[k] .. '\0' .. bucket
end

-- ADMIT for a message popped from list k: messages of tasks flow control governs go to their
-- bucket (served by F_SERVE) and are reported as held.
ADMIT[#ADMIT + 1] = function(msg, item, k, now)
  if not F_ON then return 'run' end
  local headers = msg['headers']
  if type(headers) ~= 'table' then return 'run' end
  local task = headers['task']
  if type(task) ~= 'string' or not f_match(task) then return 'run' end
  local value = headers['taskyard_partition']
  if type(value) ~= 'string' then value = '' end
  local bucket = task .. '\0' .. value
  if redis.call('LPUSH', f_bucket_key(k, bucket), item) == 1 then
    local ring = FP .. 'ring:' .. KEYS[k]
    local head = redis.call('ZRANGE', ring, 0, 0, 'WITHSCORES')
    -- A new bucket joins at the ring's current turn: no credit for having been idle.
    redis.call('ZADD', ring, 'NX', head[2] or 0, bucket)
    if not F_RING[KEYS[k]] then
      F_RING[KEYS[k]] = true
      redis.call('HSET', FP .. 'rules', 'r:' .. KEYS[k], '1')
    end
  end
  F_MOVES = F_MOVES + 1
  return 'hold'
end

-- Whether FETCH may still move messages of list k into buckets in this call.
local function F_CAN_MOVE()
  return F_MOVES < F_MOVE_BUDGET
end

local function F_QUEUE_PAUSED(k)
  return F_ON and F_QUEUE[QNAMES[k - 3]] == true
end

-- Serve up to need messages from the buckets of list k, round-robin; returns how many.
local function F_SERVE(k, need)
  if not F_ON or not F_RING[KEYS[k]] or need <= 0 then return 0 end
  local ring = FP .. 'ring:' .. KEYS[k]
  local flat = redis.call('ZRANGE', ring, 0, 63, 'WITHSCORES')
  local cands = {}
  local top = 0
  for j = 1, #flat, 2 do
    local bucket = flat[j]
    local task, value = string.match(bucket, '^(.-)%z(.*)$')
    local score = tonumber(flat[j + 1])
    if score > top then top = score end
    cands[#cands + 1] = {bucket = bucket, task = task or bucket, value = value or '',
                         score = score, w = F_WEIGHT[(task or bucket) .. '|' .. (value or '')] or 1,
                         live = true, served = 0, held = false, empty = false}
  end
  local served = 0
  local progress = true
  while progress and served < need do
    progress = false
    for _, c in ipairs(cands) do
      if c.live then
        local n = 0
        while n < c.w and served < need do
          local verdict, scope, rule, s = f_admit_bucket(c.task, c.value)
          if verdict ~= 'run' then c.live = false c.held = true break end
          local item = redis.call('RPOP', f_bucket_key(k, c.bucket))
          if not item then c.live = false c.empty = true break end
          local ok, msg = pcall(cjson.decode, item)
          local tag = DELIVER(k, item, ok and msg or nil)
          if tag and scope then f_charge(scope, rule, s, tag, c.task) end
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
    F_RING[KEYS[k]] = nil
    redis.call('HDEL', FP .. 'rules', 'r:' .. KEYS[k])
  end
  return served
end

-- Writes the rate state and start counters; returns the retry time in ms from now (0: none).
local function F_FINISH()
  if not F_ON then return 0 end
  for scope, s in pairs(F_SCOPE) do
    if s.dirty then
      local ttl = math.ceil((s.tat - NOW + s.per) * 1000)
      redis.call('SET', FP .. 'r:' .. scope, tostring(s.tat), 'PX', math.max(ttl, 1000))
    end
  end
  local slot = tostring(math.floor(NOW / 10))
  for task, n in pairs(F_STARTED) do
    local key = FP .. 'n:' .. task
    redis.call('HINCRBY', key, slot, n)
    redis.call('EXPIRE', key, 130)
  end
  if F_RETRY then return math.max(1, math.ceil((F_RETRY - NOW) * 1000)) end
  return 0
end

