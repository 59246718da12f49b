-- Apply pending acknowledgements, then pop up to n messages, each from the first non-empty list
-- in consumption order, pass each through admit(), and record each admitted one in the unacked
-- HASH and index.
-- Atomic: a message leaves its list and enters the unacked records in one step, so a worker
-- killed at any point leaves every message either queued or recorded (kombu's sweep restores
-- recorded ones); the acks (each through release()) and every admission decision are applied in
-- the same call, so a limit or a pause never sees a half-made reservation. When no message is
-- delivered the reply carries the last id of each wake stream, read in the same atomic step, so
-- an XREAD from those ids sees every wake entry a producer adds afterwards (no lost wake-up).
-- KEYS: unacked HASH, unacked ZSET, quarantine LIST, the L lists in order, the wake streams.
-- ARGV: key prefix, now (s), L, n, record (1: record unacked, 0: no-ack consumer), A, A acked
-- tags.
-- KEYS after the queues' wake streams: flow control's wake stream (read like the others).
-- Reply: {1, i1, msg1, i2, msg2, ...} (list index, 1-based, and raw message), or
-- {0, retry_ms, id1, id2, ...} (retry_ms: the smallest FINISH hook's answer, 0: none; wake
-- stream ids) when nothing was delivered, or {2, count} when only undecodable messages were
-- found (moved to the quarantine list, never dropped).
--
-- Composition (broker/lua.py compose()): this body runs after hooks.lua (the defaults), then
-- every control/*.lua in name order, concatenated into one chunk; ack.lua is built the same way,
-- so both scripts see the same hooks. A fragment may:
--   * define locals (helpers, constants) for the fragments after it;
--   * wrap admit and release, keeping the one before: `local base = admit` then
--     `admit = function(msg, item, qindex, now) ... return base(msg, item, qindex, now) end`;
--   * name keys only as prefix .. '<suffix>' (prefix = ARGV[1], the namespace under kombu's
--     global_keyprefix; each suffix documented in keys.py). Keys are derived in the script rather
--     than passed in KEYS: the transport already touches several queues in one call (like
--     kombu's BRPOP) and does not run on Redis Cluster.
-- It must not return, raise, or read ARGV beyond ARGV[1] and KEYS beyond KEYS[1], KEYS[2] (and
-- the list of a qindex it is given, KEYS[3 + qindex]): a script is not rolled back on error, so a
-- failing fragment could lose popped messages.
-- The hook lists (ADMIT, ADMIT_LAST, RELEASE, SKIP, SERVE, FINISH, RENEW) are described in
-- hooks.lua; admit() and release() call them in order.
--
-- admit(msg, item, qindex, now): msg is the decoded kombu message (msg.headers.task is the task
-- name under Celery's protocol 2), item its raw text, qindex the position of its list in
-- consumption order (the list is KEYS[3 + qindex]), now the worker's clock (s, a number).
-- Verdicts:
--   'run'  record it (unless a no-ack consumer) and deliver it;
--   'hold' not now: it goes back to the consuming end of its list after this call, in its
--          place, and later messages of the same list may still be taken (a limit, a pause).
--          Past MAX_HELD holds in one call, each further hold moves the scan on to the next
--          list, so a long paused backlog costs a bounded amount of work per fetch.
--   'drop' the fragment has disposed of it (e.g. a cancelled task recorded elsewhere): neither
--          delivered nor put back.
-- Any other value is treated as 'hold', so no message is ever lost to a mistaken verdict.
-- Before a list is popped, every SKIP hook may exclude it (a paused queue: not popped at all),
-- and the SERVE hooks deliver what they keep for it (held messages, older than the list's); they
-- are called again when the scan leaves the list.
-- release(tag) is called for every acknowledged tag (here and in ack.lua) before its unacked
-- records are removed, so it may read them (HGET KEYS[1] tag); it frees what admit took for
-- that delivery (a concurrency slot, a unique lock). kombu's own requeue and restore paths do
-- not pass through these scripts.

local MAX_HELD = 100
-- The deepest nesting of a message envelope delivered to Python: Redis' cjson decodes 1,000
-- levels, Python's decoder (kombu's loads in the worker's event loop) fails short of its
-- recursion limit, so a deeper envelope would raise out of the loop. A taskyard or Celery
-- envelope nests a few levels (the body is base64 text); this leaves room for any header.
local MAX_DEPTH = 256
-- Redis' own default, which the decoder is put back to after each message: the limit is
-- server-wide state, so it must not outlive this call (pcall never raises, so it never does).
local REDIS_MAX_DEPTH = 1000
local function decode(item)
  if not cjson.decode_max_depth then
    return pcall(cjson.decode, item)
  end
  cjson.decode_max_depth(MAX_DEPTH)
  local ok, msg = pcall(cjson.decode, item)
  cjson.decode_max_depth(REDIS_MAX_DEPTH)
  return ok, msg
end
local now = ARGV[2]
local now_s = tonumber(now)
local nlists = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local record = ARGV[5] == '1'
local nacks = tonumber(ARGV[6])
local i = 7
while nacks > 0 do
  local j = math.min(i + 999, i + nacks - 1)
  for t = i, j do release(ARGV[t]) end
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, j))
  redis.call('ZREM', KEYS[2], unpack(ARGV, i, j))
  nacks = nacks - (j - i + 1)
  i = j + 1
end
local out = {1}
local quarantined = 0
local held = {}

-- Record one message of list qindex in the unacked records and the reply; its tag, or nil when
-- it is not a kombu message (quarantined).
local function deliver(qindex, item, msg)
  local tag, info
  if type(msg) == 'table' and type(msg['properties']) == 'table' then
    tag = msg['properties']['delivery_tag']
    info = msg['properties']['delivery_info']
  end
  if type(tag) ~= 'string' or type(info) ~= 'table' then
    -- Not a kombu message: kept for an operator, never lost, never redelivered in a loop.
    redis.call('LPUSH', KEYS[3], item)
    redis.call('LTRIM', KEYS[3], 0, 9999)
    quarantined = quarantined + 1
    return nil
  end
  if record then
    redis.call('ZADD', KEYS[2], now, tag)
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
               .. ',' .. cjson.encode(info['routing_key']) .. ']')
  end
  out[#out + 1] = qindex
  out[#out + 1] = item
  return tag
end

local function serve(qindex, leaving)
  for _, hook in ipairs(SERVE) do
    local need = want - (#out - 1) / 2
    if need <= 0 then return end
    hook(qindex, need, deliver, now_s, leaving)
  end
end

-- Lists before k were found empty (or held to the bound, or skipped) and nothing else runs
-- during the script, so each further pop stays at k: strict order holds across the whole reply.
local k = 4
local last = 3 + nlists
local entered, skip = 0, false
while k <= last and (#out - 1) / 2 < want do
  if entered ~= k then
    entered, skip = k, false
    for _, hook in ipairs(SKIP) do
      if hook(k - 3) then skip = true break end
    end
    if not skip then serve(k - 3, false) end
  end
  local item = nil
  if not skip and (#out - 1) / 2 < want then item = redis.call('RPOP', KEYS[k]) end
  if not item then
    if not skip then serve(k - 3, true) end
    k = k + 1
  else
    local ok, msg = decode(item)
    if not ok or type(msg) ~= 'table' or type(msg['properties']) ~= 'table' then
      deliver(k - 3, item, nil)  -- quarantined (not kombu's, or nested too deep to decode)
    else
      local verdict = admit(msg, item, k - 3, now_s)
      if verdict == 'run' then
        deliver(k - 3, item, msg)
      elseif verdict ~= 'drop' then
        held[#held + 1] = k
        held[#held + 1] = item
        if #held >= 2 * MAX_HELD then
          k = k + 1
        end
      end
    end
  end
end
-- Held messages back where they were: the last popped is pushed first, so the first popped is
-- again the next to pop.
for h = #held - 1, 1, -2 do
  redis.call('RPUSH', KEYS[held[h]], held[h + 1])
end
local retry = 0
for _, hook in ipairs(FINISH) do
  local ms = hook(now_s)
  if ms > 0 and (retry == 0 or ms < retry) then retry = ms end
end
if #out > 1 then return out end
if quarantined > 0 then return {2, quarantined} end
local ids = {0, retry}
for s = last + 1, #KEYS do
  local tail = redis.call('XREVRANGE', KEYS[s], '+', '-', 'COUNT', 1)
  ids[#ids + 1] = tail[1] and tail[1][1] or '0-0'
end
return ids
