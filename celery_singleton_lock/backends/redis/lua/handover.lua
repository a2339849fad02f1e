-- Hand a held lock to a new holder without ever letting it go (enqueue lock -> worker).
-- KEYS[1] lock key; KEYS[2] its fencing counter key.
-- ARGV[1] current token; ARGV[2] new token; ARGV[3] ttl in ms;
-- ARGV[4..] metadata field, value pairs to overwrite.
-- Returns {1, fencing token of the acquisition} if the lock was held with ARGV[1] and now
-- belongs to ARGV[2], {0, 0} otherwise. The fencing token stays the one the lock was taken
-- with: a handover is not a new acquisition.
if redis.call('hget', KEYS[1], 'token') == ARGV[1] then
  redis.call('hset', KEYS[1], 'token', ARGV[2], unpack(ARGV, 4))
  redis.call('pexpire', KEYS[1], ARGV[3])
  return {1, tonumber(redis.call('get', KEYS[2]) or '0')}
end
return {0, 0}
