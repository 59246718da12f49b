-- Push one message onto its list and, when the list was empty, add a wake entry to the
-- queue's wake stream. Atomic: the push and its wake entry, so a worker idle on that stream
-- is woken by every empty -> non-empty change (a non-empty list never has idle workers).
-- KEYS: list, wake stream. ARGV: message, wake stream max length.

if redis.call('LPUSH', KEYS[1], ARGV[1]) == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'w', '1')
end
return 1
