-- Take the first free slot of a lock that up to N holders may hold at once (lock_limit=N).
-- KEYS[1] the lock's fencing counter key; KEYS[2..N+1] its slot keys, slot 0 first (each a
-- lock hash like acquire.lua's, all with the lock's hash tag).
-- ARGV[1] token; ARGV[2] ttl in ms; ARGV[3] fencing counter ttl in ms;
-- ARGV[4..] metadata as field, value pairs written into the slot's hash.
-- Returns {1, fencing token, slot index from 0} when a slot is taken (or one is already held
-- with this token: ttl refreshed), {0, owner id of the slot that frees first, its remaining
-- ttl in ms} when another token holds every slot.
-- The slots share one fencing counter, so tokens grow with every acquisition of the lock.
local free = nil
local owner, least = '', -1
for i = 2, #KEYS do
  local held = redis.call('hget', KEYS[i], 'token')
  if held == ARGV[1] then
    redis.call('pexpire', KEYS[i], ARGV[2])
    return {1, tonumber(redis.call('get', KEYS[1]) or '0'), i - 2}
  end
  if not held then
    free = free or i
  else
    local pttl = redis.call('pttl', KEYS[i])
    if least < 0 or pttl < least then
      least = pttl
      owner = redis.call('hget', KEYS[i], 'owner') or ''
    end
  end
end
if not free then
  return {0, owner, least}
end
local fence = redis.call('incr', KEYS[1])
if fence == 1 then
  local now = redis.call('time')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('set', KEYS[1], start, 'px', ARGV[3])
  fence = tonumber(start)
else
  redis.call('pexpire', KEYS[1], ARGV[3])
end
redis.call('hset', KEYS[free], 'token', ARGV[1], unpack(ARGV, 4))
redis.call('pexpire', KEYS[free], ARGV[2])
return {1, fence, free - 2}
