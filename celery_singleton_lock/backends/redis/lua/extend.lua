-- Extend a lock on one master if, and only if, it is still ours (compare-and-pexpire).
-- KEYS[1] lock key; ARGV[1] token; ARGV[2] new ttl in ms; ARGV[3] '1' to count a renewal.
-- Returns 1 if extended, 0 if another token holds the lock, -1 if the key is gone (expired,
-- or the master restarted empty): the caller may put it back with restore.lua.
local held = redis.call('hget', KEYS[1], 'token')
if held == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  if ARGV[3] == '1' then
    redis.call('hincrby', KEYS[1], 'renewals', 1)
  end
  return 1
end
if held then
  return 0
end
return -1
