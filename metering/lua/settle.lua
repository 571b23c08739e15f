-- Settle a served call that needs it: a per-record price is added to a
-- credit pool now that the record count is known, and an idempotency record
-- becomes "done" (only if it still names this call). A call with neither is
-- settled by doing nothing: its reservation already counts.
--
-- KEYS[1] pool counter
-- KEYS[2] idempotency record
-- ARGV[1] extra charge (1/10000 fen; credit pools only, else 0)
-- ARGV[2] 1 when the call has an Idempotency-Key, else 0
-- ARGV[3] call id

local IDEMPOTENCY_TTL = 24 * 3600
local extra = tonumber(ARGV[1])
if extra > 0 then
  redis.call('INCRBY', KEYS[1], extra)
end
if ARGV[2] == '1' and redis.call('GET', KEYS[2]) == 'pending:' .. ARGV[3] then
  redis.call('SET', KEYS[2], 'done:' .. ARGV[3], 'EX', IDEMPOTENCY_TTL)
end
return 1
