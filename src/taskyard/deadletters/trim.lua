-- Apply the bounds alone (the stats collection runs it, so an idle store still ages out).
-- KEYS[1] entries; ARGV: prefix, max_entries, cutoff. Returns how many were dropped.

return trim(tonumber(ARGV[3]), tonumber(ARGV[2]))
