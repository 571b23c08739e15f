-- Reserve quota for data calls, atomically, before they are forwarded: one
-- or more reservations per run, each decided on its own, in order. On a
-- single server a whole batch of calls is one run; on a Cluster each run
-- holds one reservation, whose keys share the licence's hash tag, so the run
-- touches one slot. The script writes counters only: what a release needs to
-- give back (the keys, the cost) stays with the caller, which settles or
-- releases each reservation exactly once.
--
-- ARGV[1] the number of reservations, n; ARGV[2] the run's deadline (the
-- server's time, microseconds; 0: none): a run the server gets to later does
-- nothing, since its caller has stopped waiting for the answer; then for
-- each reservation, in order, its argument count m and its m arguments
-- (below, numbered from 1), and KEYS holds five keys per reservation, in the
-- same order.
--
-- k[1] burst state (GCRA theoretical arrival time, microseconds)
-- k[2] pool counter: free calls used this period | prepaid calls used |
--         credit used this period (1/10000 fen)
-- k[3] charged calls of this dataset this period: the tier position of the
--         last call settled (finish.lua takes positions; read here only)
-- k[4] idempotency record (used only when a[6] is 1; always a key of
--         the same hash tag, since an empty key would name another slot): a
--         hash, state (pending | done), call (the first call's id), fp (its
--         request fingerprint) and, once served, response (the served
--         response as the gateway keeps it, when it was small enough)
-- k[5] the licence's in-flight calls: a hash, call id -> "cost|" .. a[8]
--         (the entry's format: metering/inflight.py).
--         A reserved call is entered here in the same run that counts it, and
--         leaves in the run that settles or releases it (finish.lua); an entry
--         left by a replica that died is what the ledger writer uses to
--         release the call and record it as incomplete.
--
-- a[1] burst emission interval (microseconds per call)
-- a[2] burst tolerance (microseconds: capacity * interval)
-- a[3] pool kind: free | prepaid | credit | none
-- a[4] pool limit (calls, or 1/10000 fen for credit)
-- a[5] call id
-- a[6] 1 when the call has an Idempotency-Key, else 0
-- a[7] per-call price (1/10000 fen) when no tier applies
-- a[8] the in-flight entry without its cost (metering/inflight.py: the
--      replica, pool kind, keys, the record so far)
-- a[9] the request's fingerprint (method, path, query, body digest) when the
--      call has an Idempotency-Key, else ''
-- a[10] the most the call's records can cost (1/10000 fen): the per-record
--         price times the dataset's max_records_per_call
-- a[11..m] tiers as pairs: up_to (0 = no bound), per-call price (1/10000 fen)
--
-- A paid call is priced when it is settled, at the next tier position
-- (finish.lua), so the n-th charged call of a period is priced at position n
-- whatever fails or is released meanwhile. A credit reservation therefore
-- holds the call's worst case: the dearest tier it can still land in (a
-- position after the calls settled so far) plus its records' most; settling
-- gives back the difference. A call whose worst case does not fit is refused.
--
-- Returns one {outcome, x, y} per reservation:
--   {0, used, cost, 0}     reserved (used = pool counter after it; cost = what
--                          the pool took: 1 call, or the worst case in 1/10000
--                          fen on a credit pool)
--   {1, retry_after_ms, 0} burst limit: try again later
--   {2, used, 0}           pool exhausted (free: 429; paid: 402)
--   {3, used, 0, 0, first call id, response}
--                          a retry of an idempotent call already served:
--                          answered with the kept response, not forwarded
--   {4, 0, 0, 0, first call id}
--                          the same idempotent call is still in flight
--   {5, 0, 0, 0, first call id}
--                          the key was first used for another request
--                          (another fingerprint): refused, never forwarded
--   {6, used, 0, 0, first call id}
--                          a retry of an idempotent call already served
--                          whose response was not kept (too large, or
--                          the call was ended by the ledger writer)
--   {7, 0, 0}              past the run's deadline: nothing was done

local COUNTER_TTL = 400 * 24 * 3600   -- outlives the period for usage and reconciliation
-- A call in flight holds its Idempotency-Key at most this long (longer than
-- the largest upstream timeout): a replica that dies mid-call does not lock
-- the key for a day. Settlement then keeps it 24 h as "done" (finish.lua).
local PENDING_TTL = 900

local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])

local function reserve(k, a, last)
  local burst_key, pool_key, paid_key, idem_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local inflight_key = KEYS[k + 4]

  -- Burst first: GCRA. Allowed when the theoretical arrival time is within
  -- tolerance. Replays of an idempotent call count here too: the gateway
  -- answers them itself, but they are calls of the app like any other.
  local interval = tonumber(ARGV[a])
  local tolerance = tonumber(ARGV[a + 1])
  local tat = tonumber(redis.call('GET', burst_key) or '0')
  if tat < now_us then tat = now_us end
  local allow_at = tat + interval - tolerance
  if allow_at > now_us then
    return {1, math.ceil((allow_at - now_us) / 1000), 0}
  end
  local function take_burst()
    redis.call('SET', burst_key, tat + interval, 'PX', math.ceil((tat + interval - now_us) / 1000) + 1000)
  end

  -- An Idempotency-Key names one request, by its fingerprint: the same key
  -- with another request is refused; a repeat of the request is never
  -- charged again, nor forwarded again.
  local idem = ARGV[a + 5] == '1'
  local fingerprint = ARGV[a + 8]
  if idem then
    local seen = redis.call('HMGET', idem_key, 'state', 'call', 'fp')
    if seen[1] then
      local first = seen[2] or ''
      if seen[3] ~= fingerprint then
        return {5, 0, 0, 0, first}
      end
      if seen[1] ~= 'done' then
        return {4, 0, 0, 0, first}
      end
      local used = tonumber(redis.call('GET', pool_key) or '0')
      local response = redis.call('HGET', idem_key, 'response')
      if not response then
        return {6, used, 0, 0, first}
      end
      take_burst()
      return {3, used, 0, 0, first, response}
    end
  end

  local kind = ARGV[a + 2]
  local limit = tonumber(ARGV[a + 3])
  local used = tonumber(redis.call('GET', pool_key) or '0')
  local cost = 1

  if kind == 'none' then
    return {2, used, 0}
  elseif kind == 'credit' then
    -- The dearest tier a position after the calls settled so far can fall
    -- in: a tier whose bound is not yet passed; past the last bounded tier,
    -- the per-call price.
    local next_position = tonumber(redis.call('GET', paid_key) or '0') + 1
    local worst = -1
    local open = true
    local i = a + 10
    while i < last do
      local up_to = tonumber(ARGV[i])
      if up_to == 0 or up_to >= next_position then
        worst = math.max(worst, tonumber(ARGV[i + 1]))
      end
      open = up_to ~= 0
      i = i + 2
    end
    if open then worst = math.max(worst, tonumber(ARGV[a + 6])) end
    cost = worst + tonumber(ARGV[a + 9])
  end

  if used + cost > limit then
    return {2, used, 0}
  end

  take_burst()
  used = redis.call('INCRBY', pool_key, cost)
  -- Counters get their time to live when they are made (the first call of
  -- the period), not again on every call.
  if kind ~= 'prepaid' and used == cost then redis.call('EXPIRE', pool_key, COUNTER_TTL) end
  if idem then
    redis.call('HSET', idem_key, 'state', 'pending', 'call', ARGV[a + 4], 'fp', fingerprint)
    redis.call('EXPIRE', idem_key, PENDING_TTL)
  end
  redis.call('HSET', inflight_key, ARGV[a + 4], cost .. '|' .. ARGV[a + 7])
  return {0, used, cost, 0}
end

local results = {}
local deadline = tonumber(ARGV[2])
if deadline > 0 and now_us > deadline then
  for n = 1, tonumber(ARGV[1]) do results[n] = {7, 0, 0} end
  return results
end
local a = 3
for n = 1, tonumber(ARGV[1]) do
  local m = tonumber(ARGV[a])
  results[n] = reserve(5 * n - 4, a + 1, a + m)
  a = a + 1 + m
end
return results
