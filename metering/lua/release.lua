-- Release a reservation: the call failed upstream (5xx, timeout, connection
-- error) or its response was cut short, so it is not charged. The caller
-- releases each reservation at most once, and never one it settled. The
-- idempotency record is dropped (if it still names this call) so that a
-- retry with the same key is served and charged once.
--
-- KEYS[1] pool counter
-- KEYS[2] paid calls of this dataset this period
-- KEYS[3] idempotency record
-- ARGV[1] the cost the reservation took
-- ARGV[2] pool kind: free | prepaid | credit
-- ARGV[3] 1 when the call has an Idempotency-Key, else 0
-- ARGV[4] call id

redis.call('DECRBY', KEYS[1], tonumber(ARGV[1]))
if ARGV[2] ~= 'free' then
  redis.call('DECR', KEYS[2])
end
if ARGV[3] == '1' and redis.call('GET', KEYS[3]) == 'pending:' .. ARGV[4] then
  redis.call('DEL', KEYS[3])
end
return 1
