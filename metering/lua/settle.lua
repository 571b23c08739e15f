-- Settle a reservation: the call was served, so the reserved quota stays
-- charged; a per-record price is added to a credit pool now that the record
-- count is known; an idempotency record becomes "done". Settling twice, or
-- after a release, does nothing.
--
-- KEYS[1] the reservation record
-- ARGV[1] call id
-- ARGV[2] extra charge (1/10000 fen, credit pools only)
-- ARGV[3] idempotency time-to-live (seconds)
--
-- Returns 1 when settled now, 0 when there was nothing to settle.

local pool = redis.call('HGET', KEYS[1], 'pool')
if not pool then return 0 end
local kind = redis.call('HGET', KEYS[1], 'kind')
local idem = redis.call('HGET', KEYS[1], 'idem')
local extra = tonumber(ARGV[2])
if kind == 'credit' and extra > 0 then
  redis.call('INCRBY', pool, extra)
end
if idem and idem ~= '' then
  redis.call('SET', idem, 'done:' .. ARGV[1], 'EX', tonumber(ARGV[3]))
end
redis.call('DEL', KEYS[1])
return 1
