--[[
Recurring offers (charging/subscriptions.py computes the periods and the fees).

A subscription is the field <offer id> of KEYS[13]: "<state>|<period start ms>|<period end
ms>|<periods paid>" (creditline/store/contract.py SUBSCRIPTION_FIELDS), state one of
SUBSCRIPTION_STATES: active; cancelling (ends when its period does); suspended (a renewal
found the money short: no fee taken, no allowances, tried again at the period's end). Its
period end is its member "<offer id>|<account id>" of KEYS[14], scored by that instant.
Its allowances are the buckets "<offer id>#<n>" ('#' is in no bucket id a caller may give).

  SUBSCRIBE offer_id end_ms fee policy plans default_plan bucket_limit [allowance]...
            the first period, from now to end_ms, for fee (the server prorated it)
            -> account | "NOT_SOLD|<plan>" | "UNAFFORDABLE|<available>" | "TOO_MANY_BUCKETS"
            (status "DUPLICATE": subscribed already; a cancelled one is kept on, free)
  CANCEL    offer_id immediately ("1": now, its allowances gone; "0": at the period's end)
            -> account | "NOT_SUBSCRIBED"
  RENEW     offer_id due_end_ms next_end_ms fee policy [allowance]...
            the period from due_end_ms to next_end_ms, once: status "OK" (renewed),
            "SHORT" (the policy applied), "ENDED" (a cancelled one ended), or
            "NOT_DUE" (renewed already, or not due) | "NOT_SUBSCRIBED"
  PLAN_DUE  the plan change scheduled for now takes over (if charge.lua has not taken it
            already) and the open sessions are asked to re-authorise -> account | "NOT_DUE"
An allowance is 6 arguments: rating group, units, expires_at_s, priority, unit kind,
rollover cap (units of the period before carried over at most).
policy (the offer's on_short_balance): suspend, bar (and the account barred), credit_limit
(the fee may use the credit limit; past it, suspend).
]]

local ALLOWANCE_ARGS = 6
-- The most allowances an offer grants (charging/catalogue.py MAX_ALLOWANCES_PER_OFFER):
-- the buckets of an offer looked for when its allowances end.
local MAX_ALLOWANCES = 8
local SUBSCRIPTION_VALUE = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$'

local function renewal_member(offer_id) return offer_id .. '|' .. account_id end
local function allowance_bucket(offer_id, n) return offer_id .. '#' .. n end

local function read_subscription(offer_id)
  local value = redis.call('HGET', subscriptions_key, offer_id)
  if not value then return nil end
  local state, start_ms, end_ms, periods = string.match(value, SUBSCRIPTION_VALUE)
  return { state = state, start_ms = start_ms, end_ms = end_ms, periods = tonumber(periods) }
end

local function write_subscription(offer_id, state, start_ms, end_ms, periods)
  redis.call('HSET', subscriptions_key, offer_id,
    table.concat({ state, start_ms, end_ms, text(periods) }, '|'))
  redis.call('ZADD', renewals_key, end_ms, renewal_member(offer_id))
end

-- An allowance's bucket ended: at most `cap` of its units carried over (returned), the
-- rest announced as expired. (A bucket charge.lua removed already, expired, carries none.)
local function end_allowance(id, cap)
  local value = redis.call('HGET', buckets_key, id)
  if not value then return 0 end
  redis.call('HDEL', buckets_key, id)
  local rg, remaining = string.match(value, '^([^|]*)|([^|]*)|')
  remaining = tonumber(remaining)
  local carried = math.min(remaining, cap)
  if remaining > carried then
    notify('bucket_expired|rg|' .. rg .. '|bucket|' .. id .. '|units|' .. text(remaining - carried))
  end
  return carried
end

local function end_allowances(offer_id)
  for n = 1, MAX_ALLOWANCES do end_allowance(allowance_bucket(offer_id, n), 0) end
end

-- The period's allowances (ARGV[first]...) as the offer's buckets, each with what its
-- bucket of the period before carries over (rolling), up to its cap.
local function grant_allowances(offer_id, first, rolling)
  local granted = (#ARGV - first + 1) / ALLOWANCE_ARGS
  for n = 1, MAX_ALLOWANCES do
    local i, id = first + (n - 1) * ALLOWANCE_ARGS, allowance_bucket(offer_id, n)
    local carried = end_allowance(id, (rolling and n <= granted) and tonumber(ARGV[i + 5]) or 0)
    if n <= granted then
      redis.call('HSET', buckets_key, id, bucket_value(ARGV[i],
        text(tonumber(ARGV[i + 1]) + carried), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]))
    end
  end
end

-- A fee taken: the balance and the books (fees), a CDR; returns what its notification
-- says after its type.
local function take_fee(offer_id, fee, periods, cause)
  local balance = text(redis.call('HINCRBY', account_key, 'balance', -fee))
  redis.call('HINCRBY', account_key, 'fees', fee)
  offer_record('fee', offer_id .. '#' .. text(periods), offer_id, text(fee), balance, cause)
  return '|amount|' .. text(fee) .. '|balance|' .. balance .. '|period|' .. text(periods)
end

-- Whether the account's own buckets and the offer's would be more than bucket_limit.
local function too_many_buckets(offer_id, granted, bucket_limit)
  local held = redis.call('HLEN', buckets_key)
  for n = 1, MAX_ALLOWANCES do
    held = held - redis.call('HEXISTS', buckets_key, allowance_bucket(offer_id, n))
  end
  return held + granted > bucket_limit
end

local function subscribe(offer_id, end_ms, fee, policy, plans, default_plan, bucket_limit)
  local first = 14
  local sub = read_subscription(offer_id)
  if sub and sub.state == 'active' then return account('DUPLICATE') end
  if sub and sub.state == 'cancelling' then  -- (kept on: its period is paid)
    write_subscription(offer_id, 'active', sub.start_ms, sub.end_ms, sub.periods)
    notify('subscribed|amount|0|period|' .. text(sub.periods), 'offer', offer_id)
    return account('OK')
  end
  local refusal = sale_refusal(plans, default_plan, fee, policy == 'credit_limit')
  if refusal then return refusal end
  if too_many_buckets(offer_id, (#ARGV - first + 1) / ALLOWANCE_ARGS, bucket_limit) then
    return 'TOO_MANY_BUCKETS'
  end
  local periods = (sub and sub.periods or 0) + 1
  notify('subscribed' .. take_fee(offer_id, fee, periods, 'subscribed'), 'offer', offer_id)
  grant_allowances(offer_id, first, false)
  write_subscription(offer_id, 'active', now_ms, end_ms, periods)
  ask_open_sessions_again()
  return account('OK')
end

local function end_subscription(offer_id, cause)
  end_allowances(offer_id)
  redis.call('HDEL', subscriptions_key, offer_id)
  redis.call('ZREM', renewals_key, renewal_member(offer_id))
  notify('subscription_ended', 'offer', offer_id, 'cause', cause)
  ask_open_sessions_again()
end

local function cancel(offer_id, immediately)
  local sub = read_subscription(offer_id)
  if not sub then return 'NOT_SUBSCRIBED' end
  if immediately == '1' or sub.state == 'suspended' then
    end_subscription(offer_id, 'cancelled')
  elseif sub.state == 'active' then
    redis.call('HSET', subscriptions_key, offer_id, table.concat(
      { 'cancelling', sub.start_ms, sub.end_ms, text(sub.periods) }, '|'))
    notify('subscription_cancelled|ends_ms|' .. sub.end_ms, 'offer', offer_id)
  end
  return account('OK')
end

-- Money short at a renewal: no fee, no allowances, the policy applied, announced, a CDR
-- (nothing charged, result 4012); tried again when the period ends.
local function renewal_refused(offer_id, sub, next_end_ms, fee, policy, available)
  end_allowances(offer_id)
  write_subscription(offer_id, 'suspended', sub.end_ms, next_end_ms, sub.periods)
  if policy == 'bar' then set_state('barred', 'renewal') end
  notify('renewal_failed|amount|' .. text(fee) .. '|available|' .. available,
    'offer', offer_id, 'policy', policy)
  offer_record('fee', offer_id .. '#' .. text(sub.periods + 1), offer_id, '0',
    text(redis.call('HGET', account_key, 'balance')), 'short_balance', '4012')
  ask_open_sessions_again()
  return account('SHORT')
end

local function renew(offer_id, due_end_ms, next_end_ms, fee, policy)
  local first = 12
  local sub = read_subscription(offer_id)
  if not sub then
    redis.call('ZREM', renewals_key, renewal_member(offer_id))
    return 'NOT_SUBSCRIBED'
  end
  if sub.end_ms ~= due_end_ms or tonumber(now_ms) < tonumber(due_end_ms) then
    return 'NOT_DUE'
  end
  if sub.state == 'cancelling' then
    end_subscription(offer_id, 'period_ended')
    return account('ENDED')
  end
  local available = available_money(policy == 'credit_limit')
  if available < fee then
    return renewal_refused(offer_id, sub, next_end_ms, fee, policy, text(available))
  end
  notify('renewed' .. take_fee(offer_id, fee, sub.periods + 1, 'renewed'), 'offer', offer_id)
  grant_allowances(offer_id, first, true)
  write_subscription(offer_id, 'active', due_end_ms, next_end_ms, sub.periods + 1)
  ask_open_sessions_again()
  return account('OK')
end

local function plan_due()
  local fields = redis.call('HMGET', account_key, 'next_plan', 'next_plan_from_ms')
  if fields[1] and tonumber(now_ms) < tonumber(fields[2]) then return 'NOT_DUE' end
  redis.call('ZREM', renewals_key, '|' .. account_id)
  if fields[1] then
    redis.call('HSET', account_key, 'plan', fields[1])
    redis.call('HDEL', account_key, 'next_plan', 'next_plan_from_ms')
  end
  ask_open_sessions_again()
  return account('OK')
end
