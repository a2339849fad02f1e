-- Put a lock that a quorum still holds back on a master where its key is gone (a master
-- restarted without persistence), only if the key is free there.
-- KEYS[1] lock key; KEYS[2] its fencing counter key.
-- ARGV[1] token; ARGV[2] ttl in ms; ARGV[3] the lock's fencing token; ARGV[4] counter ttl in
-- ms; ARGV[5..] metadata as field, value pairs written into the lock hash.
-- Returns 1 if the lock was put back, 0 if the key exists (another holder took it there).
-- The counter is raised to at least the lock's fencing token, so a later majority that
-- includes this master still issues a larger token.
if redis.call('exists', KEYS[1]) == 1 then
  return 0
end
redis.call('hset', KEYS[1], 'token', ARGV[1], unpack(ARGV, 5))
redis.call('pexpire', KEYS[1], ARGV[2])
local current = tonumber(redis.call('get', KEYS[2]) or '0')
if current < tonumber(ARGV[3]) then
  redis.call('set', KEYS[2], ARGV[3], 'px', ARGV[4])
end
return 1
