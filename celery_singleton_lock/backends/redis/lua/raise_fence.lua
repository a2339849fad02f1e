-- Raise a fencing counter to at least a given value (Redlock: after masters disagreed).
-- KEYS[1] fencing counter key; ARGV[1] fencing token; ARGV[2] counter ttl in ms.
-- Returns 1. Raising every master of a majority to the issued token means any later
-- majority, which shares a master with this one, issues a larger token.
local current = tonumber(redis.call('get', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
end
return 1
