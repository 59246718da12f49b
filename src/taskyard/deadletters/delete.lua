-- Delete entries by id. Atomic per call: entries, indexes and gauge counts together.
-- KEYS[1] entries; ARGV: prefix, id... Returns how many existed.

local n = 0
for i = 2, #ARGV do n = n + remove(ARGV[i]) end
return n
