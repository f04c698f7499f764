-- ChangePlan: now (from_ms "0"), or from the next billing period (from_ms).
local function change_plan(plan, default_plan, from_ms, expected_plan)
  local from = plan_now(default_plan)
  if from_ms == '0' then
    redis.call('HSET', account_key, 'plan', plan)
    redis.call('HDEL', account_key, 'next_plan', 'next_plan_from_ms')
    redis.call('ZREM', renewals_key, '|' .. account_id)
    notify('plan_changed|plan|' .. plan .. '|from|' .. from)
    ask_open_sessions_again()
    return account('OK')
  end
  if from ~= expected_plan then return 'CONFLICT|' .. from end
  redis.call('HSET', account_key, 'plan', from, 'next_plan', plan, 'next_plan_from_ms', from_ms)
  -- (the renewal sweep asks the open sessions again then: PLAN_DUE)
  redis.call('ZADD', renewals_key, from_ms, '|' .. account_id)
  notify('plan_changed|plan|' .. plan .. '|from|' .. from .. '|effective_from_ms|' .. from_ms)
  return account('OK')
end

-- The refusal of an add-on purchase before anything is written, else nil.
local function purchase_refusal(purchase_id, price, plans, default_plan, bucket_limit,
                                allowances)
  local refusal = sale_refusal(plans, default_plan, price, true)
  if refusal then return refusal end
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
  local first_allowance = 13
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
  local price_text, balance_text = text(price), text(balance)
  notify('purchase|amount|' .. price_text .. '|balance|' .. balance_text,
    'offer', offer_id, 'purchase_id', purchase_id)
  offer_record('purchase', purchase_id, offer_id, price_text, balance_text, 'purchase')
  ask_open_sessions_again()
  return account('OK')
end

