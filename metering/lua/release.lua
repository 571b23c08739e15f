-- Release a reservation: the call failed upstream (5xx, timeout, connection
-- error) or never finished, so it is not charged. Releasing twice, or after
-- a settle, does nothing; the idempotency record is dropped so that a retry
-- with the same key is served and charged once.
--
-- KEYS[1] the reservation record
--
-- Returns 1 when released now, 0 when there was nothing to release.

local pool = redis.call('HGET', KEYS[1], 'pool')
if not pool then return 0 end
local cost = tonumber(redis.call('HGET', KEYS[1], 'cost'))
local kind = redis.call('HGET', KEYS[1], 'kind')
local idem = redis.call('HGET', KEYS[1], 'idem')
redis.call('DECRBY', pool, cost)
if kind ~= 'free' then
  redis.call('DECR', redis.call('HGET', KEYS[1], 'tiers'))
end
if idem and idem ~= '' then redis.call('DEL', idem) end
redis.call('DEL', KEYS[1])
return 1
