-- The default fragment of the fetch, ack, release and renew scripts: the names every later
-- fragment and the body rely on. The contract (what a fragment may define, what a verdict
-- means) is in fetch.lua's header.

-- Prefix of every key a fragment names: "<global_keyprefix><namespace>:" (Keys.script_prefix).
local prefix = ARGV[1]

-- Hook lists (the fetch contract shared by flow control and job control): a feature's fragment
-- appends its functions; the body calls them through admit(), release() and the others below.
--   ADMIT[#ADMIT + 1] = function(msg, item, qindex, now) -> 'run' | 'hold' | 'drop'
--   ADMIT_LAST: the same, run after every ADMIT function (hooks that take resources, such as
--     flow control's slots, so a message another hook drops never takes one)
--   RELEASE[#RELEASE + 1] = function(tag): ack, requeue and restore of a delivery
--   SKIP[#SKIP + 1] = function(qindex) -> true: the list is not popped in this call (paused)
--   SERVE[#SERVE + 1] = function(qindex, need, deliver, now, leaving) -> messages the hook
--     delivered for that list from elsewhere (flow control's held buckets) through
--     deliver(qindex, item, msg); called when the scan reaches the list and when it leaves it
--   FINISH[#FINISH + 1] = function(now) -> ms after which a held message may run (0: none);
--     the body waits no longer than the smallest before fetching again
--   RENEW[#RENEW + 1] = function(tag, now): a held delivery's lease is renewed
local ADMIT, ADMIT_LAST, RELEASE, SKIP, SERVE, FINISH, RENEW = {}, {}, {}, {}, {}, {}, {}

-- Decide what happens to one popped, decoded kombu message: 'run', 'hold' or 'drop'.
local function admit(msg, item, qindex, now)
  for _, hook in ipairs(ADMIT) do
    local verdict = hook(msg, item, qindex, now)
    if verdict ~= 'run' then return verdict end
  end
  for _, hook in ipairs(ADMIT_LAST) do
    local verdict = hook(msg, item, qindex, now)
    if verdict ~= 'run' then return verdict end
  end
  return 'run'
end

-- Called once per acknowledged (or requeued, restored) delivery tag, before its unacked
-- records are removed.
local function release(tag)
  for _, hook in ipairs(RELEASE) do hook(tag) end
end
