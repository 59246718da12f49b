-- Flow control's RELEASE hook (issue 19), a fragment of every script that settles tags: FETCH
-- (its ack part), ACK, RELEASE (requeue, restore). The main body defines FP and the RELEASE list.
-- Per-tag state: the tags HASH (FP .. 'tags': tag -> scope) and the scope's slot ZSET
-- (FP .. 's:' .. scope: tag -> last lease renewal, s). Both are written by flow's admission.

local F_TAGS = nil        -- whether the tags HASH exists (read once per call)

-- RELEASE: a tag's concurrency slot goes back (ack, dead letter, cancel, requeue), and workers
-- waiting for a slot are woken.
RELEASE[#RELEASE + 1] = function(tag)
  if F_TAGS == nil then F_TAGS = redis.call('EXISTS', FP .. 'tags') == 1 end
  if not F_TAGS then return end
  local scope = redis.call('HGET', FP .. 'tags', tag)
  if not scope then return end
  redis.call('HDEL', FP .. 'tags', tag)
  redis.call('ZREM', FP .. 's:' .. scope, tag)
  redis.call('XADD', FP .. 'wake', 'MAXLEN', '~', 100, '*', 'w', '1')
end
