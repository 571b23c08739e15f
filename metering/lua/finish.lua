-- Finish reserved calls: settle (served: it stays charged) or release (an
-- upstream failure, a response cut short, a call that never finished: it is
-- not charged); or, on a Cluster only, price a served call before its record
-- is appended. One or more calls per run, each on its own; on a Cluster one
-- call per run, whose keys share the licence's hash tag.
--
-- A call is finished once: only while its in-flight entry (metering/inflight.py; written by
-- reserve.lua, with the cost the reservation took) is there, and the entry
-- goes in the same run. So a gateway finishing a call and the ledger writer
-- recovering it after the gateway died can not both act on it.
--
-- Tier positions. A paid call (prepaid or credit) takes its tier position
-- when it is settled: the next of the dataset's charged calls this period
-- (k[2], INCR), so the n-th charged call of a period is priced at position n
-- whatever fails, is released or is replayed in between, on any number of
-- replicas; a released call never took one. Its charge is the price at that
-- position plus its records' (the extra); a credit pool, which reserved the
-- worst case, gives back the difference.
--
-- On a single server a call's record is appended to the call-record log in
-- the run that finishes the call, before its state changes: the record is
-- durable when the call is settled or released, and one run does both. A
-- record whose charge is decided here is sent with its charge left out at
-- byte `charge_at`, where the run writes it. (On a Cluster the log lives in
-- another slot: a served paid call is first priced here -- its position taken
-- and its price kept beside its in-flight entry, as "<call id>:p" -- then the
-- gateway appends the record with its charge, then settles.)
--
-- A settled idempotent call marks its idempotency record (reserve.lua)
-- done for 24 h, and keeps the response it was served with there, when the
-- gateway sent one: retries are answered with it. A released one frees its
-- key: a retry is a new call.
--
-- Records of calls that reserved nothing (refusals) are appended by the same
-- run, before the calls it finishes.
--
-- A run the server gets to past its deadline does nothing at all: its
-- caller has stopped waiting, told its client the record could not be made
-- durable, and handed its calls to the ledger writer, which records them
-- `incomplete` and releases what they hold.
--
-- ARGV[1] the number of calls, n; ARGV[2] 1 when KEYS[1] is the call-record
--   log, else 0; ARGV[3] the run's deadline (the server's time,
--   microseconds; 0: none); ARGV[4] the number of records appended alone, r;
--   then those r records; then ARGS_PER_CALL arguments per call:
--   1 action: settle | release | price
--   2 extra: the charge of the call's records (1/10000 fen); when `prices`
--     is '' the call's whole charge
--   3 pool kind: free | prepaid | credit | none
--   4 1 when the call has an Idempotency-Key, else 0
--   5 call id
--   6 the call's record for the log ('' for none)
--   7 charge_at: the byte offset in the record where its charge goes (0: the
--     record is whole)
--   8 prices: "<per-call price>;<up_to>:<price>;..." (1/10000 fen; up_to 0 =
--     no bound) to price the call by its position; '' when its charge is known
--   9 the served response to keep for retries of an idempotent call ('' for
--     none; settle only)
-- KEYS: the log when ARGV[2] is 1; then four per call: pool counter, charged
--   calls of the dataset this period, idempotency record, the licence's
--   in-flight hash.
--
-- Returns one integer per call: settle and release, 1 finished now, 0
-- already finished; price, the call's price (1/10000 fen), -1 when the call
-- is finished already; then 1 per record appended alone. Past the deadline:
-- -2 for each.

local IDEMPOTENCY_TTL = 24 * 3600
local COUNTER_TTL = 400 * 24 * 3600   -- as reserve.lua's
local ARGS_PER_CALL = 9
local has_log = false

-- The price at `position` from a `prices` list (see ARGV above).
local function price_at(prices, position)
  local default = nil
  for item in string.gmatch(prices, '[^;]+') do
    if default == nil then
      default = tonumber(item)
    else
      local up_to, price = string.match(item, '^(%d+):(%d+)$')
      up_to = tonumber(up_to)
      if up_to == 0 or position <= up_to then return tonumber(price) end
    end
  end
  return default or 0
end

-- Take the call's tier position (once: a Cluster's price run may have taken
-- it already) and return its price, or nil when `prices` is ''.
local function take_position(paid_key, inflight_key, call_id, prices)
  local priced = redis.call('HGET', inflight_key, call_id .. ':p')
  if priced then
    redis.call('HDEL', inflight_key, call_id .. ':p')
    return tonumber(priced)
  end
  local position = redis.call('INCR', paid_key)
  if position == 1 then redis.call('EXPIRE', paid_key, COUNTER_TTL) end
  if prices == '' then return nil end
  return price_at(prices, position)
end

local function append(record)
  if record ~= '' then
    if not has_log then
      error('a record needs the log key')
    end
    redis.call('XADD', KEYS[1], '*', 'r', record)
  end
end

-- The idempotency record is this call's, still in flight.
local function pending(idem_key, call_id)
  local held = redis.call('HMGET', idem_key, 'state', 'call')
  return held[1] == 'pending' and held[2] == call_id
end

local function keep_idempotency(idem, idem_key, call_id, response)
  if idem == '1' and pending(idem_key, call_id) then
    if response ~= '' then
      redis.call('HSET', idem_key, 'state', 'done', 'response', response)
    else
      redis.call('HSET', idem_key, 'state', 'done')
    end
    redis.call('EXPIRE', idem_key, IDEMPOTENCY_TTL)
  end
end

has_log = ARGV[2] == '1'
local calls = tonumber(ARGV[1])
local deadline = tonumber(ARGV[3])
local alone = tonumber(ARGV[4])
local results = {}
if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000000 + tonumber(t[2]) > deadline then
    for i = 1, calls + alone do results[i] = -2 end
    return results
  end
end
for i = 1, alone do
  append(ARGV[4 + i])
  results[calls + i] = 1
end
local base = has_log and 1 or 0
for n = 1, calls do
  local a = 5 + alone + ARGS_PER_CALL * (n - 1)
  local k = base + 4 * n - 3
  local pool_key, paid_key, idem_key, inflight_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local action, extra, kind, idem, call_id = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local record, charge_at, prices, response = ARGV[a + 5], tonumber(ARGV[a + 6]), ARGV[a + 7], ARGV[a + 8]
  local paid = kind == 'prepaid' or kind == 'credit'

  if action == 'settle' and not paid then
    -- Nothing to price or give back: HDEL's answer says whether it was there.
    append(record)
    if redis.call('HDEL', inflight_key, call_id) == 0 then
      results[n] = 0
    else
      keep_idempotency(idem, idem_key, call_id, response)
      results[n] = 1
    end
  else
    local entry = redis.call('HGET', inflight_key, call_id)
    if action == 'price' then
      if not entry then
        results[n] = -1
      else
        local price = take_position(paid_key, inflight_key, call_id, prices) or 0
        redis.call('HSET', inflight_key, call_id .. ':p', price)
        results[n] = price
      end
    elseif action == 'settle' then
      local charge = 0
      if entry then
        local price = take_position(paid_key, inflight_key, call_id, prices)
        charge = prices == '' and extra or extra + price
      end
      if charge_at > 0 then
        record = string.sub(record, 1, charge_at) .. string.format('%d', charge) .. string.sub(record, charge_at + 1)
      end
      append(record)
      if not entry then
        results[n] = 0
      else
        redis.call('HDEL', inflight_key, call_id)
        local held = tonumber(string.match(entry, '^(%d+)|'))
        if kind == 'credit' and charge ~= held then redis.call('INCRBY', pool_key, charge - held) end
        keep_idempotency(idem, idem_key, call_id, response)
        results[n] = 1
      end
    else
      append(record)
      if not entry then
        results[n] = 0
      else
        redis.call('HDEL', inflight_key, call_id, call_id .. ':p')
        redis.call('DECRBY', pool_key, tonumber(string.match(entry, '^(%d+)|')))
        if idem == '1' and pending(idem_key, call_id) then
          redis.call('DEL', idem_key)
        end
        results[n] = 1
      end
    end
  end
end
return results
