-- Run release() for deliveries that go back to their queue without an ack (a reject with
-- requeue, a reservation restored by the channel): what admit took for them (a concurrency
-- slot) is free at once. Built from the same fragments as fetch.lua. Atomic per call.
-- KEYS: none. ARGV: key prefix, tags. Reply: the number of tags.

for t = 2, #ARGV do release(ARGV[t]) end
return #ARGV - 1
