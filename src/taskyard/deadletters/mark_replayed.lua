-- Mark an entry replayed (it leaves the "dead" state, its indexes and the gauge). Atomic with
-- respect to RECORD, DELETE and another replay: only an entry in state "dead" is marked, so
-- two operators replaying at once send it once. KEYS[1] entries; ARGV: prefix, id, new task
-- id, time (s). Returns 1 when marked, 0 when the entry is gone or not dead.

local id = ARGV[2]
local raw = redis.call('HGET', entries, id)
if not raw then return 0 end
local entry = cjson.decode(raw)
if entry.state ~= 'dead' then return 0 end
unindex(id, entry)
entry.state = 'replayed'
entry.replayed_as = ARGV[3]
entry.replayed_at = tonumber(ARGV[4])
redis.call('HSET', entries, id, cjson.encode(entry))
add_index(id, entry)
return 1
