--[[
admin.lua: account administration, one atomic step per call.

KEYS (all under the account's partition hash tag):
  KEYS[1] account hash    (see charge.lua)
  KEYS[2] buckets hash    bucket id -> "rg|remaining|expires_at_s|priority|initial|kind"
  KEYS[3] usage hash      <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged
  KEYS[4] open sessions   set of open session keys
  KEYS[5] top-ups hash    top-up id -> amount (applied once per id)
  KEYS[6] final sessions  set of the ids of open sessions holding their final units
  KEYS[7] event stream    the partition's charge notifications
  KEYS[8] event counter   the partition's count of notifications (see charge.lua)
  KEYS[9] account index   the partition's set of account ids (reconcile, metrics)

ARGV[1] is the operation, ARGV[2] the account id, ARGV[3] now (unix ms), ARGV[4] the event
stream trimming ("MAXLEN,<n>" or "MINID,<ms>"), then the operation's arguments:
  CREATE  initial_balance credit_limit bucket_limit low_balance_thresholds ("t1,t2" or "")
          [bucket fields x6]...            -> account | "EXISTS" | "TOO_MANY_BUCKETS"
  TOPUP   amount top_up_id                 -> account | "UNKNOWN"
  BUCKET  bucket_limit id rg units expires_at_s priority kind
          -> account | "UNKNOWN" | "BUCKET_EXISTS" | "TOO_MANY_BUCKETS"
  STATE   active|barred                    -> account | "UNKNOWN"
  GET     -> account | "UNKNOWN"
where account is { status ("OK", or "DUPLICATE" for a top-up id seen before), account
fields, buckets, usage, open session count }, read in the same step as the operation: the
answer shows the account as the operation left it, in one round trip.
Bucket fields: id, rating group, units, expires_at_s (0: never), priority, unit kind.
A top-up announces itself, and asks for re-authorisation of every session held at its
final units, on the event stream.
]]

local account_key, buckets_key, usage_key, sessions_key, topups_key, final_key, events_key,
  event_counter_key, index_key = unpack(KEYS, 1, 9)
local op, account_id, now_ms = ARGV[1], ARGV[2], ARGV[3]
local trim_strategy, trim_threshold = string.match(ARGV[4], '^(%u+),(%d+)$')

local function bucket_value(rg, units, expires, priority, kind)
  return table.concat({ rg, units, expires, priority, units, kind }, '|')
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

local function account(status)
  return { status, redis.call('HGETALL', account_key), redis.call('HGETALL', buckets_key),
    redis.call('HGETALL', usage_key), redis.call('SCARD', sessions_key) }
end

if op == 'CREATE' then
  if exists then return 'EXISTS' end
  local bucket_limit = tonumber(ARGV[7])
  local first_bucket = 9
  if (#ARGV - first_bucket + 1) / 6 > bucket_limit then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', account_key, 'balance', ARGV[5], 'credit_limit', ARGV[6],
    'state', 'active', 'reserved', '0', 'initial', ARGV[5], 'topped_up', '0',
    'charged', '0', 'refunded', '0', 'created_ms', now_ms)
  if ARGV[8] ~= '' then redis.call('HSET', account_key, 'low_balance', ARGV[8]) end
  redis.call('SADD', index_key, account_id)
  for i = first_bucket, #ARGV, 6 do
    redis.call('HSET', buckets_key, ARGV[i],
      bucket_value(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]))
  end
  return account('OK')
end

if not exists then return 'UNKNOWN' end

if op == 'TOPUP' then
  if redis.call('HSETNX', topups_key, ARGV[6], ARGV[5]) == 0 then
    return account('DUPLICATE')
  end
  local balance = redis.call('HINCRBY', account_key, 'balance', ARGV[5])
  redis.call('HINCRBY', account_key, 'topped_up', ARGV[5])
  notify('top_up|amount|' .. ARGV[5] .. '|balance|' .. string.format('%d', balance),
    'top_up_id', ARGV[6])
  for _, session_id in ipairs(redis.call('SMEMBERS', final_key)) do
    notify('reauthorization_needed', 's', session_id)
  end
  redis.call('DEL', final_key)
  return account('OK')
elseif op == 'BUCKET' then
  if redis.call('HEXISTS', buckets_key, ARGV[6]) == 1 then return 'BUCKET_EXISTS' end
  if redis.call('HLEN', buckets_key) >= tonumber(ARGV[5]) then return 'TOO_MANY_BUCKETS' end
  redis.call('HSET', buckets_key, ARGV[6],
    bucket_value(ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]))
  return account('OK')
elseif op == 'STATE' then
  redis.call('HSET', account_key, 'state', ARGV[5])
  return account('OK')
elseif op == 'GET' then
  return account('OK')
end
return redis.error_reply('admin.lua: unknown operation ' .. tostring(op))
