-- Record one entry, merging with an earlier entry of the same id (first_at kept, times + 1),
-- then apply the count and age bounds. Atomic: the entry, its indexes and the gauge counts
-- change together, so a concurrent search never sees an entry its indexes do not list.
-- KEYS[1] entries; ARGV: prefix, id, entry JSON, max_entries, cutoff (s). Returns trimmed.

local id = ARGV[2]
local entry = cjson.decode(ARGV[3])
local old_raw = redis.call('HGET', entries, id)
if old_raw then
  local old = cjson.decode(old_raw)
  unindex(id, old)
  if tonumber(old.first_at) and tonumber(old.first_at) < tonumber(entry.first_at) then
    entry.first_at = old.first_at
  end
  entry.times = (tonumber(old.times) or 1) + 1
end
redis.call('HSET', entries, id, cjson.encode(entry))
add_index(id, entry)
return trim(tonumber(ARGV[5]), tonumber(ARGV[4]))
