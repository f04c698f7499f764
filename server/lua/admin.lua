--[[
admin.lua: account administration, one atomic step per call.

KEYS (all of one account, under one hash tag):
  KEYS[1] account hash   (see charge.lua)
  KEYS[2] buckets hash   bucket id -> "rg|remaining|expires_at_s|priority|initial|kind"
  KEYS[3] usage hash     <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged
  KEYS[4] open sessions  set of open session keys
  KEYS[5] top-ups hash   top-up id -> amount (applied once per id)

ARGV[1] is the operation, the rest its arguments:
  CREATE  initial_balance credit_limit now_s bucket_limit [bucket fields x6]...
          -> "OK" | "EXISTS" | "TOO_MANY_BUCKETS"
  TOPUP   amount top_up_id                 -> "OK" | "DUPLICATE" | "UNKNOWN"
  BUCKET  bucket_limit id rg units expires_at_s priority kind
          -> "OK" | "UNKNOWN" | "EXISTS" | "TOO_MANY_BUCKETS"
  STATE   active|barred                    -> "OK" | "UNKNOWN"
  GET     -> { account fields..., buckets..., usage..., open session count } or "UNKNOWN"
Bucket fields: id, rating group, units, expires_at_s (0: never), priority, unit kind.
]]

local account_key, buckets_key, usage_key, sessions_key, topups_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op = ARGV[1]

local function bucket_value(rg, units, expires, priority, kind)
  return table.concat({ rg, units, expires, priority, units, kind }, '|')
end

local exists = redis.call('EXISTS', account_key) == 1

if op == 'CREATE' then
  if exists then return 'EXISTS' end
  local bucket_limit = tonumber(ARGV[5])
  local count = (#ARGV - 5) / 6
  if count > bucket_limit then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', account_key, 'balance', ARGV[2], 'credit_limit', ARGV[3],
    'state', 'active', 'reserved', '0', 'initial', ARGV[2], 'topped_up', '0',
    'charged', '0', 'refunded', '0', 'created_s', ARGV[4])
  for i = 6, #ARGV, 6 do
    redis.call('HSET', buckets_key, ARGV[i],
      bucket_value(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]))
  end
  return 'OK'
end

if not exists then return 'UNKNOWN' end

if op == 'TOPUP' then
  if redis.call('HSETNX', topups_key, ARGV[3], ARGV[2]) == 0 then return 'DUPLICATE' end
  redis.call('HINCRBY', account_key, 'balance', ARGV[2])
  redis.call('HINCRBY', account_key, 'topped_up', ARGV[2])
  return 'OK'
elseif op == 'BUCKET' then
  if redis.call('HEXISTS', buckets_key, ARGV[3]) == 1 then return 'EXISTS' end
  if redis.call('HLEN', buckets_key) >= tonumber(ARGV[2]) then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', buckets_key, ARGV[3],
    bucket_value(ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]))
  return 'OK'
elseif op == 'STATE' then
  redis.call('HSET', account_key, 'state', ARGV[2])
  return 'OK'
elseif op == 'GET' then
  return { redis.call('HGETALL', account_key), redis.call('HGETALL', buckets_key),
    redis.call('HGETALL', usage_key), redis.call('SCARD', sessions_key) }
end
return redis.error_reply('admin.lua: unknown operation ' .. tostring(op))
