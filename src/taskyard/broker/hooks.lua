-- The default fragment of the fetch and ack scripts: the names every later fragment and the
-- body rely on, and the two hooks as no-ops (every message runs; releasing holds nothing).
-- The contract (what a fragment may define, what a verdict means) is in fetch.lua's header.

-- Prefix of every key a fragment names: "<global_keyprefix><namespace>:" (Keys.script_prefix).
local prefix = ARGV[1]

-- Decide what happens to one popped, decoded kombu message: 'run', 'hold' or 'drop'.
local function admit(msg, item, qindex, now)
  return 'run'
end

-- Called once per acknowledged delivery tag, before its unacked records are removed.
local function release(tag)
end
