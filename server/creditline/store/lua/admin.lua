--[[
admin.lua: account administration, one atomic step per call.

KEYS (all under the account's partition hash tag):
  KEYS[1] account hash    (see charge.lua)
  KEYS[2] buckets hash    bucket id -> "rg|remaining|expires_at_s|priority|initial|kind|
                          serial|reserved" (see charge.lua)
  KEYS[3] usage hash      <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged
  KEYS[4] open sessions   set of open session keys
  KEYS[5] top-ups hash    top-up id -> amount (applied once per id)
  KEYS[6] final sessions  hash: open session id -> its rating groups at final units
  KEYS[7] event stream    the partition's charge notifications
  KEYS[8] event counter   the partition's count of notifications (see charge.lua)
  KEYS[9] account index   the partition's set of account ids (reconcile, metrics)
  KEYS[10] adjustments    hash: adjustment id -> amount (applied once per id)
  KEYS[11] CDR stream     the partition's charging data records
  KEYS[12] purchases      hash: purchase id -> offer id (applied once per id)

ARGV[1] is the operation, ARGV[2] the account id, ARGV[3] now (unix ms), ARGV[4] the event
stream trimming ("MAXLEN,<n>" or "MINID,<ms>"), then the operation's arguments:
  CREATE  initial_balance credit_limit bucket_limit low_balance_thresholds ("t1,t2" or "")
          plan [bucket fields x6]...       -> account | "EXISTS" | "TOO_MANY_BUCKETS"
  TOPUP   amount top_up_id                 -> account | "UNKNOWN" | "CONFLICT|<amount>"
  ADJUST  amount adjustment_id reason      -> account | "UNKNOWN" | "CONFLICT|<amount>"
                                              | "UNAFFORDABLE|<available>"
  BUCKET  bucket_limit id rg units expires_at_s priority kind
          -> account | "UNKNOWN" | "BUCKET_EXISTS" | "TOO_MANY_BUCKETS"
  STATE   active|barred                    -> account | "UNKNOWN"
  PLAN    plan default_plan from_ms expected_plan -> account | "UNKNOWN" | "CONFLICT|<plan>"
          from_ms "0": the account's plan from now (its open sessions asked to re-authorise
          every rating group they hold); else from then on (next_plan, next_plan_from_ms:
          charge.lua takes it from that instant), refused when the account's plan is no
          longer expected_plan (the plan whose billing period the server computed from_ms by)
  PURCHASE purchase_id offer_id price plans ("p1,p2": the plans that sell it)
          default_plan bucket_limit [allowance: rg units expires_at_s priority kind]...
          -> account | "UNKNOWN" | "CONFLICT|<offer id>" | "UNAFFORDABLE|<available>"
          | "NOT_SOLD|<plan>" | "TOO_MANY_BUCKETS" | "BUCKET_EXISTS"
  GET     -> account | "UNKNOWN"
where account is { status ("OK", or "DUPLICATE" for a top-up or adjustment id applied
before with the same amount; another amount is a CONFLICT naming the first), account
fields, buckets (live ones: expired ones are not listed), usage, open session count },
read in the same step as the operation: the answer shows the account as the operation left
it, in one round trip. An adjustment is a credit (or, negative, a debit within what is
available) that reverses no charge: customer care's goodwill or correction, with a reason;
it is announced, gets a CDR (charged: minus the amount), and counts in the books as
`adjusted`.
Bucket fields: id, rating group, units, expires_at_s (0: never), priority, unit kind.
A top-up announces itself, and asks for re-authorisation of every session held at its
final units, on the event stream.
]]

local account_key, buckets_key, usage_key, sessions_key, topups_key, final_key, events_key,
  event_counter_key, account_index_key, adjustments_key, cdrs_key, purchases_key =
  unpack(KEYS, 1, 12)
-- (one argument per line, named as server/contract.py AdminArgs names it)
local op = ARGV[1]
local account_id = ARGV[2]
local now_ms = ARGV[3]
local event_trim = ARGV[4]
local trim_strategy, trim_threshold = string.match(event_trim, '^(%u+),(%d+)$')

-- A new bucket, numbered in its account (a session's reservation names the bucket by
-- this serial: an id can come back after its bucket expired).
local function bucket_value(rg, units, expires, priority, kind)
  local serial = redis.call('HINCRBY', account_key, 'bucket_serial', 1)
  return table.concat({ rg, units, expires, priority, units, kind, serial, 0 }, '|')
end

local function expired(value)
  local expires = tonumber(string.match(value, '^[^|]*|[^|]*|([^|]*)|'))
  return expires ~= 0 and expires <= math.floor(now_ms / 1000)
end

-- One event per stream entry here (charge.lua packs a request's events into one, see its
-- KEYS[7]): `event` is "<type>|<field>|<value>|..." of numbers only; the client's own
-- strings (a top-up id, session ids) go in fields of the entry, which every event of an
-- entry carries.
local function notify(event, ...)
  redis.call('XADD', events_key, trim_strategy, '~', trim_threshold, '*',
    'a', account_id, 'ts', now_ms, 'n', redis.call('INCR', event_counter_key), 'e', event, ...)
end

local exists = redis.call('EXISTS', account_key) == 1

local function live_buckets()
  local raw, live = redis.call('HGETALL', buckets_key), {}
  for i = 1, #raw, 2 do
    if not expired(raw[i + 1]) then
      live[#live + 1] = raw[i]
      live[#live + 1] = raw[i + 1]
    end
  end
  return live
end

local function account(status)
  return { status, redis.call('HGETALL', account_key), live_buckets(),
    redis.call('HGETALL', usage_key), redis.call('SCARD', sessions_key) }
end

-- Expired buckets removed (announced when units were left), as charge.lua does.
local function drop_expired_buckets()
  local raw = redis.call('HGETALL', buckets_key)
  for i = 1, #raw, 2 do
    if expired(raw[i + 1]) then
      redis.call('HDEL', buckets_key, raw[i])
      local rg, remaining = string.match(raw[i + 1], '^([^|]*)|([^|]*)|')
      if tonumber(remaining) > 0 then
        notify('bucket_expired|rg|' .. rg .. '|bucket|' .. raw[i] .. '|units|' .. remaining)
      end
    end
  end
end

-- An id applied once (top-ups, adjustments): nil the first time (recorded by the caller
-- once it is applied), else the answer: the account as it is, or the amount applied first.
local function seen_before(ids_key, id, amount)
  local first = redis.call('HGET', ids_key, id)
  if not first then return nil end
  if first == amount then return account('DUPLICATE') end
  return 'CONFLICT|' .. first
end

-- A top-up or a credit: every session held at its final units should ask again, for the
-- rating groups it holds them for.
local function ask_reauthorization()
  local held = redis.call('HGETALL', final_key)
  for i = 1, #held, 2 do
    for rg in string.gmatch(held[i + 1], '[^,]+') do
      notify('reauthorization_needed|rg|' .. rg, 's', held[i])
    end
  end
  redis.call('DEL', final_key)
end

-- A session's rating groups: its fields RG_STATE_FIELD (creditline/store/contract.py
-- SESSION_RATING_GROUP_PREFIX, as charge.lua writes them)
local RG_STATE_FIELD = '^g:(.+)$'

-- A plan change: every open session should ask again for every rating group it holds
-- (its prices changed), and the sessions held at final units are held no more.
local function ask_open_sessions_again()
  for _, session_key in ipairs(redis.call('SMEMBERS', sessions_key)) do
    local session_id = redis.call('HGET', session_key, 'session')
    for _, field in ipairs(redis.call('HKEYS', session_key)) do
      local rg = string.match(field, RG_STATE_FIELD)
      if rg then notify('reauthorization_needed|rg|' .. rg, 's', session_id) end
    end
  end
  redis.call('DEL', final_key)
end

-- The account's plan now: its plan, or the one scheduled from an instant passed already
-- (as charge.lua reads it), or the catalogue's default for an account made before plans.
local function plan_now(default_plan)
  local fields = redis.call('HMGET', account_key, 'plan', 'next_plan', 'next_plan_from_ms')
  if fields[2] and tonumber(now_ms) >= tonumber(fields[3]) then return fields[2] end
  return fields[1] or default_plan
end

-- ChangePlan: now (from_ms "0"), or from the next billing period (from_ms).
local function change_plan(plan, default_plan, from_ms, expected_plan)
  local from = plan_now(default_plan)
  if from_ms == '0' then
    redis.call('HSET', account_key, 'plan', plan)
    redis.call('HDEL', account_key, 'next_plan', 'next_plan_from_ms')
    notify('plan_changed|plan|' .. plan .. '|from|' .. from)
    ask_open_sessions_again()
    return account('OK')
  end
  if from ~= expected_plan then return 'CONFLICT|' .. from end
  redis.call('HSET', account_key, 'plan', from, 'next_plan', plan, 'next_plan_from_ms', from_ms)
  notify('plan_changed|plan|' .. plan .. '|from|' .. from .. '|effective_from_ms|' .. from_ms)
  return account('OK')
end

-- The refusal of an add-on purchase before anything is written, else nil.
local function purchase_refusal(purchase_id, price, plans, default_plan, bucket_limit,
                                allowances)
  local plan = plan_now(default_plan)
  if not string.find(',' .. plans .. ',', ',' .. plan .. ',', 1, true) then
    return 'NOT_SOLD|' .. plan
  end
  local fields = redis.call('HMGET', account_key, 'balance', 'credit_limit', 'reserved')
  local available = fields[1] + fields[2] - fields[3]
  if available < price then return 'UNAFFORDABLE|' .. string.format('%d', available) end
  if redis.call('HLEN', buckets_key) + allowances > bucket_limit then
    return 'TOO_MANY_BUCKETS'
  end
  for n = 1, allowances do
    if redis.call('HEXISTS', buckets_key, purchase_id .. '.' .. n) == 1 then
      return 'BUCKET_EXISTS'
    end
  end
  return nil
end

-- An add-on bought: its price debited, its allowances buckets (ids "<purchase id>.<n>"),
-- announced, a CDR, and the open sessions asked again (their quotas may grow).
local function purchase(purchase_id, offer_id, price, plans, default_plan, bucket_limit)
  local first = redis.call('HGET', purchases_key, purchase_id)
  if first == offer_id then return account('DUPLICATE') end
  if first then return 'CONFLICT|' .. first end
  local first_allowance = 11
  local allowances = (#ARGV - first_allowance + 1) / 5
  local refusal = purchase_refusal(purchase_id, price, plans, default_plan, bucket_limit,
    allowances)
  if refusal then return refusal end
  redis.call('HSET', purchases_key, purchase_id, offer_id)
  local balance = redis.call('HINCRBY', account_key, 'balance', -price)
  redis.call('HINCRBY', account_key, 'purchased', price)
  for n = 1, allowances do
    local i = first_allowance + (n - 1) * 5
    redis.call('HSET', buckets_key, purchase_id .. '.' .. n,
      bucket_value(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]))
  end
  local price_text, balance_text = string.format('%d', price), string.format('%d', balance)
  notify('purchase|amount|' .. price_text .. '|balance|' .. balance_text,
    'offer', offer_id, 'purchase_id', purchase_id)
  redis.call('XADD', cdrs_key, '*', 'account', account_id, 'session', purchase_id,
    'ended_ms', now_ms, 'balance_after', balance_text, 'kind', 'purchase',
    'started_ms', now_ms, 'cause', 'purchase', 'result', '2001',
    'charged', price_text, 'items', '', 'offer', offer_id)
  ask_open_sessions_again()
  return account('OK')
end

if op == 'CREATE' then
  if exists then return 'EXISTS' end
  local bucket_limit = tonumber(ARGV[7])
  local first_bucket = 10
  if (#ARGV - first_bucket + 1) / 6 > bucket_limit then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', account_key, 'balance', ARGV[5], 'credit_limit', ARGV[6],
    'state', 'active', 'reserved', '0', 'initial', ARGV[5], 'topped_up', '0',
    'charged', '0', 'refunded', '0', 'adjusted', '0', 'purchased', '0', 'created_ms', now_ms)
  if ARGV[8] ~= '' then redis.call('HSET', account_key, 'low_balance', ARGV[8]) end
  redis.call('HSET', account_key, 'plan', ARGV[9])
  redis.call('SADD', account_index_key, account_id)
  for i = first_bucket, #ARGV, 6 do
    redis.call('HSET', buckets_key, ARGV[i],
      bucket_value(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]))
  end
  return account('OK')
end

if not exists then return 'UNKNOWN' end

if op == 'TOPUP' then
  local seen = seen_before(topups_key, ARGV[6], ARGV[5])
  if seen then return seen end
  redis.call('HSET', topups_key, ARGV[6], ARGV[5])
  local balance = redis.call('HINCRBY', account_key, 'balance', ARGV[5])
  redis.call('HINCRBY', account_key, 'topped_up', ARGV[5])
  notify('top_up|amount|' .. ARGV[5] .. '|balance|' .. string.format('%d', balance),
    'top_up_id', ARGV[6])
  ask_reauthorization()
  return account('OK')
elseif op == 'ADJUST' then
  local amount, adjustment_id, reason = tonumber(ARGV[5]), ARGV[6], ARGV[7]
  local seen = seen_before(adjustments_key, adjustment_id, ARGV[5])
  if seen then return seen end
  local fields = redis.call('HMGET', account_key, 'balance', 'credit_limit', 'reserved')
  local available = fields[1] + fields[2] - fields[3]
  if amount < 0 and available + amount < 0 then
    return 'UNAFFORDABLE|' .. string.format('%d', available)
  end
  redis.call('HSET', adjustments_key, adjustment_id, ARGV[5])
  local balance = redis.call('HINCRBY', account_key, 'balance', ARGV[5])
  redis.call('HINCRBY', account_key, 'adjusted', ARGV[5])
  local balance_text = string.format('%d', balance)
  notify('adjustment|amount|' .. ARGV[5] .. '|balance|' .. balance_text,
    'adjustment_id', adjustment_id, 'reason', reason)
  redis.call('XADD', cdrs_key, '*', 'account', account_id, 'session', adjustment_id,
    'ended_ms', now_ms, 'balance_after', balance_text, 'kind', 'adjustment',
    'started_ms', now_ms, 'cause', 'adjustment', 'result', '2001',
    'charged', string.format('%d', -amount), 'items', '', 'reason', reason)
  if amount > 0 then ask_reauthorization() end
  return account('OK')
elseif op == 'BUCKET' then
  drop_expired_buckets()
  if redis.call('HEXISTS', buckets_key, ARGV[6]) == 1 then return 'BUCKET_EXISTS' end
  if redis.call('HLEN', buckets_key) >= tonumber(ARGV[5]) then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', buckets_key, ARGV[6],
    bucket_value(ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]))
  return account('OK')
elseif op == 'STATE' then
  redis.call('HSET', account_key, 'state', ARGV[5])
  return account('OK')
elseif op == 'PLAN' then
  return change_plan(ARGV[5], ARGV[6], ARGV[7], ARGV[8])
elseif op == 'PURCHASE' then
  return purchase(ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9], tonumber(ARGV[10]))
elseif op == 'GET' then
  return account('OK')
end
return redis.error_reply('admin.lua: unknown operation ' .. tostring(op))
