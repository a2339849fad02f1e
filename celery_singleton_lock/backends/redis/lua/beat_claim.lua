-- Claim one firing of a beat schedule entry, only for the current leader, only once.
-- KEYS[1] beat leader lock key (a lock hash); KEYS[2] schedule state hash (entry -> last run).
-- ARGV[1] leader token; ARGV[2] entry name; ARGV[3] the entry's previous run (unix seconds);
-- ARGV[4] this run (unix seconds).
-- Returns 1 if the caller may send the entry now, 0 if it was already sent after ARGV[3]
-- (by another leader), -1 if the caller no longer holds the leader lock.
if redis.call('hget', KEYS[1], 'token') ~= ARGV[1] then
  return -1
end
local last = redis.call('hget', KEYS[2], ARGV[2])
if last and tonumber(last) > tonumber(ARGV[3]) + 0.0005 then
  return 0
end
redis.call('hset', KEYS[2], ARGV[2], ARGV[4])
return 1
