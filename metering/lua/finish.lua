-- Finish reserved calls: settle (served: it stays charged) or release (an
-- upstream failure, a response cut short, a call that never finished: it is
-- not charged). One or more calls per run, each on its own; on a Cluster one
-- call per run, whose keys share the licence's hash tag.
--
-- A call is finished once: only while its in-flight entry (written by
-- reserve.lua, with the cost the reservation took) is there, and the entry
-- goes in the same run. So a gateway finishing a call and the ledger writer
-- recovering it after the gateway died can not both act on it. A settle
-- needs only to know that the entry was there (HDEL's answer); a release
-- reads the cost it gives back from the entry first.
--
-- On a single server a call's record is appended to the call-record log in
-- the run that finishes the call, before it: the record is durable when the
-- call is settled or released, and one run does both. (On a Cluster the log
-- lives in another slot: the gateway appends first, then finishes.)
--
-- A settled idempotent call marks its idempotency record (reserve.lua)
-- done for 24 h, and keeps the response it was served with there, when the
-- gateway sent one: retries are answered with it. A released one frees its
-- key: a retry is a new call.
--
-- ARGV[1] the number of calls, n; ARGV[2] 1 when KEYS[1] is the call-record
--   log, else 0; then PER_CALL arguments per call, numbered from 1:
--   1 action (settle | release)
--   2 extra charge (1/10000 fen, credit pools only, else 0; settle only)
--   3 pool kind
--   4 1 when the call has an Idempotency-Key, else 0
--   5 call id
--   6 the call's record for the log ('' for none)
--   7 not read here ('0')
--   8 the served response to keep for retries of an idempotent call ('' for
--     none; settle only)
-- KEYS: the log when ARGV[2] is 1; then four per call: pool counter, paid
--   calls of the dataset this period, idempotency record, the licence's
--   in-flight hash.
--
-- Returns one integer per call: 1 finished now, 0 already finished.

local IDEMPOTENCY_TTL = 24 * 3600
local PER_CALL = 8
-- The idempotency record is this call's, still in flight.
local function pending(idem_key, call_id)
  local held = redis.call('HMGET', idem_key, 'state', 'call')
  return held[1] == 'pending' and held[2] == call_id
end

local has_log = ARGV[2] == '1'
local base = has_log and 1 or 0
local results = {}
for n = 1, tonumber(ARGV[1]) do
  local a = 3 + PER_CALL * (n - 1)
  local k = base + 4 * n - 3
  local pool_key, paid_key, idem_key, inflight_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local action, extra, kind, idem, call_id = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local record, response = ARGV[a + 5], ARGV[a + 7]
  if record ~= '' then
    if not has_log then
      return redis.error_reply('a record needs the log key')
    end
    redis.call('XADD', KEYS[1], '*', 'r', record)
  end
  if action == 'settle' then
    if redis.call('HDEL', inflight_key, call_id) == 0 then
      results[n] = 0
    else
      if extra > 0 then
        redis.call('INCRBY', pool_key, extra)
      end
      if idem == '1' and pending(idem_key, call_id) then
        if response ~= '' then
          redis.call('HSET', idem_key, 'state', 'done', 'response', response)
        else
          redis.call('HSET', idem_key, 'state', 'done')
        end
        redis.call('EXPIRE', idem_key, IDEMPOTENCY_TTL)
      end
      results[n] = 1
    end
  else
    local entry = redis.call('HGET', inflight_key, call_id)
    if not entry then
      results[n] = 0
    else
      redis.call('HDEL', inflight_key, call_id)
      redis.call('DECRBY', pool_key, tonumber(string.match(entry, '^(%d+)|')))
      if kind ~= 'free' then
        redis.call('DECR', paid_key)
      end
      if idem == '1' and pending(idem_key, call_id) then
        redis.call('DEL', idem_key)
      end
      results[n] = 1
    end
  end
end
return results
