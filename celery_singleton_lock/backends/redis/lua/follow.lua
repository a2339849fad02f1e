-- Become (or stay) the one follow-up of a held lock, or stop being it (lock_on_duplicate =
-- "coalesce").
-- KEYS[1] lock key (a lock hash); KEYS[2] its follow-up key (a string: the follow-up's task id,
-- same hash tag).
-- ARGV[1] task id; ARGV[2] 'take' or 'drop'; ARGV[3] follow-up ttl in ms ('take').
-- take: returns {1, ARGV[1]} when ARGV[1] is now the follow-up (its ttl refreshed): nobody was,
--   or the follow-up named has taken the lock since (it runs, so it waits no more);
--   {0, the follow-up's task id} when another task waits as the follow-up.
-- drop: deletes the follow-up key if it names ARGV[1]; returns {1, ARGV[1]} if it did, else
--   {0, the follow-up's task id or ''}.
local current = redis.call('get', KEYS[2])
if ARGV[2] == 'drop' then
  if current == ARGV[1] then
    redis.call('del', KEYS[2])
    return {1, ARGV[1]}
  end
  return {0, current or ''}
end
if current and current ~= ARGV[1] and current ~= redis.call('hget', KEYS[1], 'owner') then
  return {0, current}
end
redis.call('set', KEYS[2], ARGV[1], 'px', ARGV[3])
return {1, ARGV[1]}
