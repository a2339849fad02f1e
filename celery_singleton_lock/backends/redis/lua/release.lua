-- Release a lock on one master if, and only if, it is still ours (compare-and-delete).
-- KEYS[1] lock key; ARGV[1] token; ARGV[2] channel to notify waiters on ('' for none).
-- Returns 1 if the lock was ours and is deleted, 0 if it is gone or held by another token.
if redis.call('hget', KEYS[1], 'token') == ARGV[1] then
  redis.call('del', KEYS[1])
  if ARGV[2] ~= '' then
    redis.call('publish', ARGV[2], KEYS[1])
  end
  return 1
end
return 0
