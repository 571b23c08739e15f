-- Reserve quota for one data call, atomically, before it is forwarded.
-- Every key shares the licence's hash tag, so the script touches one
-- Redis Cluster slot. It writes counters only: what a release needs to give
-- back (the keys, the cost) stays with the caller, which settles or releases
-- each reservation exactly once.
--
-- KEYS[1] burst state (GCRA theoretical arrival time, microseconds)
-- KEYS[2] pool counter: free calls used this period | prepaid calls used |
--         credit used this period (1/10000 fen)
-- KEYS[3] paid calls of this dataset this period (usage; prices graduated tiers)
-- KEYS[4] idempotency record (used only when ARGV[6] is 1; always a key of
--         the same hash tag, since an empty key would name another slot)
--
-- ARGV[1] burst emission interval (microseconds per call)
-- ARGV[2] burst tolerance (microseconds: capacity * interval)
-- ARGV[3] pool kind: free | prepaid | credit | none
-- ARGV[4] pool limit (calls, or 1/10000 fen for credit)
-- ARGV[5] call id
-- ARGV[6] 1 when the call has an Idempotency-Key, else 0
-- ARGV[7] per-call price (1/10000 fen) when no tier applies
-- ARGV[8..] tiers as pairs: up_to (0 = no bound), per-call price (1/10000 fen)
--
-- Returns {outcome, a, b}:
--   {0, used, cost}        reserved (used = pool counter after it)
--   {1, retry_after_ms, 0} burst limit: try again later
--   {2, used, 0}           pool exhausted (free: 429; paid: 402)
--   {3, used, 0}           a retry of an idempotent call already charged
--   {4, 0, 0}              the same idempotent call is still in flight

local COUNTER_TTL = 400 * 24 * 3600   -- outlives the period for usage and reconciliation
-- A call in flight holds its Idempotency-Key at most this long (longer than
-- the largest upstream timeout): a replica that dies mid-call does not lock
-- the key for a day. Settlement then keeps it 24 h as "done".
local PENDING_TTL = 900

local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])

-- Burst first: GCRA. Allowed when the theoretical arrival time is within
-- tolerance. Replays of an idempotent call count here too: they are
-- forwarded again, so the upstream is protected from them as from any call.
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_us then tat = now_us end
local allow_at = tat + interval - tolerance
if allow_at > now_us then
  return {1, math.ceil((allow_at - now_us) / 1000), 0}
end
local function take_burst()
  redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil((tat + interval - now_us) / 1000) + 1000)
end

-- An idempotent repeat is not charged again.
local idem = ARGV[6] == '1'
if idem then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    if string.sub(seen, 1, 5) == 'done:' then
      take_burst()
      return {3, tonumber(redis.call('GET', KEYS[2]) or '0'), 0}
    end
    return {4, 0, 0}
  end
end

local kind = ARGV[3]
local limit = tonumber(ARGV[4])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local cost = 1

if kind == 'none' then
  return {2, used, 0}
elseif kind == 'credit' then
  local position = tonumber(redis.call('GET', KEYS[3]) or '0') + 1
  cost = tonumber(ARGV[7])
  local i = 8
  while ARGV[i] do
    local up_to = tonumber(ARGV[i])
    if up_to == 0 or position <= up_to then cost = tonumber(ARGV[i + 1]) break end
    i = i + 2
  end
end

if used + cost > limit then
  return {2, used, 0}
end

take_burst()
used = redis.call('INCRBY', KEYS[2], cost)
if kind ~= 'prepaid' then redis.call('EXPIRE', KEYS[2], COUNTER_TTL) end
if kind ~= 'free' then
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], COUNTER_TTL)
end
if idem then
  redis.call('SET', KEYS[4], 'pending:' .. ARGV[5], 'EX', PENDING_TTL)
end
return {0, used, cost}
