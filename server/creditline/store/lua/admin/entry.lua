if op == 'CREATE' then
  if exists then return 'EXISTS' end
  if is_member then return create_member(ARGV[11], ARGV[12]) end
  local bucket_limit = tonumber(ARGV[9])
  local first_bucket = 13
  if (#ARGV - first_bucket + 1) / 6 > bucket_limit then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', account_key, 'balance', ARGV[7], 'credit_limit', ARGV[8],
    'state', 'active', 'reserved', '0', 'initial', ARGV[7], 'topped_up', '0',
    'charged', '0', 'refunded', '0', 'adjusted', '0', 'purchased', '0', 'fees', '0',
    'created_ms', now_ms)
  if ARGV[10] ~= '' then redis.call('HSET', account_key, 'low_balance', ARGV[10]) end
  redis.call('HSET', account_key, 'plan', ARGV[11])
  redis.call('SADD', account_index_key, account_id)
  for i = first_bucket, #ARGV, 6 do
    redis.call('HSET', buckets_key, ARGV[i],
      bucket_value(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]))
  end
  return account('OK')
end

if not exists then return 'UNKNOWN' end
local refusal = member_refusal()
if refusal then return refusal end

if op == 'TOPUP' then
  local seen = seen_before(topups_key, ARGV[8], ARGV[7])
  if seen then return seen end
  redis.call('HSET', topups_key, ARGV[8], ARGV[7])
  local balance = redis.call('HINCRBY', account_key, 'balance', ARGV[7])
  redis.call('HINCRBY', account_key, 'topped_up', ARGV[7])
  notify('top_up|amount|' .. ARGV[7] .. '|balance|' .. string.format('%d', balance),
    'top_up_id', ARGV[8])
  ask_reauthorization()
  return account('OK')
elseif op == 'ADJUST' then
  local amount, adjustment_id, reason = tonumber(ARGV[7]), ARGV[8], ARGV[9]
  local seen = seen_before(adjustments_key, adjustment_id, ARGV[7])
  if seen then return seen end
  local fields = redis.call('HMGET', account_key, 'balance', 'credit_limit', 'reserved')
  local available = fields[1] + fields[2] - fields[3]
  if amount < 0 and available + amount < 0 then
    return 'UNAFFORDABLE|' .. string.format('%d', available)
  end
  redis.call('HSET', adjustments_key, adjustment_id, ARGV[7])
  local balance = redis.call('HINCRBY', account_key, 'balance', ARGV[7])
  redis.call('HINCRBY', account_key, 'adjusted', ARGV[7])
  local balance_text = string.format('%d', balance)
  notify('adjustment|amount|' .. ARGV[7] .. '|balance|' .. balance_text,
    'adjustment_id', adjustment_id, 'reason', reason)
  redis.call('XADD', cdrs_key, '*', 'account', account_id, 'session', adjustment_id,
    'ended_ms', now_ms, 'balance_after', balance_text, 'kind', 'adjustment',
    'started_ms', now_ms, 'cause', 'adjustment', 'result', '2001',
    'charged', string.format('%d', -amount), 'items', '', 'reason', reason)
  if amount > 0 then ask_reauthorization() end
  return account('OK')
elseif op == 'BUCKET' then
  drop_expired_buckets()
  if redis.call('HEXISTS', buckets_key, ARGV[8]) == 1 then return 'BUCKET_EXISTS' end
  if redis.call('HLEN', buckets_key) >= tonumber(ARGV[7]) then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', buckets_key, ARGV[8],
    bucket_value(ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]))
  return account('OK')
elseif op == 'STATE' then
  set_state(ARGV[7], 'admin')
  return account('OK')
elseif op == 'PLAN' then
  return change_plan(ARGV[7], ARGV[8], ARGV[9], ARGV[10])
elseif op == 'PURCHASE' then
  return purchase(ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10], ARGV[11], tonumber(ARGV[12]))
elseif op == 'SUBSCRIBE' then
  return subscribe(ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10], ARGV[11], ARGV[12],
    tonumber(ARGV[13]))
elseif op == 'CANCEL' then
  return cancel(ARGV[7], ARGV[8])
elseif op == 'RENEW' then
  return renew(ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11])
elseif op == 'PLAN_DUE' then
  return plan_due()
elseif op == 'LIMIT' then
  return set_limit(ARGV[7])
elseif op == 'GET' then
  return account('OK')
end
return redis.error_reply('admin.lua: unknown operation ' .. tostring(op))
