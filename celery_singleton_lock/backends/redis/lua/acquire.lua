-- Take a lock on one master.
-- KEYS[1] lock key (a hash holding the token and the holder's metadata);
-- KEYS[2] fencing counter key (same hash tag as KEYS[1]).
-- ARGV[1] token; ARGV[2] ttl in ms; ARGV[3] fencing counter ttl in ms;
-- ARGV[4..] metadata as field, value pairs written into the lock hash.
-- Returns {1, fencing token} when acquired (or already held with this token: ttl refreshed),
-- {0, holder owner id, remaining ttl in ms} when another token holds the lock.
-- A missing counter starts at the server's time in microseconds; every acquisition gives it
-- ARGV[3] ms more to live. Tokens keep growing after it expires: the counter would need more
-- than one acquisition per microsecond, on average, to catch up with the server's clock.
local held = redis.call('hget', KEYS[1], 'token')
if held then
  if held ~= ARGV[1] then
    return {0, redis.call('hget', KEYS[1], 'owner') or '', redis.call('pttl', KEYS[1])}
  end
  redis.call('pexpire', KEYS[1], ARGV[2])
  return {1, tonumber(redis.call('get', KEYS[2]) or '0')}
end
local fence = redis.call('incr', KEYS[2])
if fence == 1 then
  local now = redis.call('time')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('set', KEYS[2], start, 'px', ARGV[3])
  fence = tonumber(start)
else
  redis.call('pexpire', KEYS[2], ARGV[3])
end
redis.call('hset', KEYS[1], 'token', ARGV[1], unpack(ARGV, 4))
redis.call('pexpire', KEYS[1], ARGV[2])
return {1, fence}
