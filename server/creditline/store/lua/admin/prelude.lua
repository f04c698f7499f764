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
  KEYS[13] subscriptions  hash: recurring offer id -> its subscription (subscriptions.lua)
  KEYS[14] renewals       the partition's sorted set of what falls due: a subscription's
                          period end ("<offer id>|<account id>") and a scheduled plan
                          change ("|<account id>"), scored by when (unix ms)
  KEYS[15] money hash     the account hash holding the money: KEYS[1] again, or a group
                          member's group's (see charge.lua KEYS[12]); a member's KEYS[2]
                          is its group's buckets too
  KEYS[16] members        the group's set of member ids (groups.lua)

ARGV[1] is the operation, ARGV[2] the account id, ARGV[3] now (unix ms), ARGV[4] the event
stream trimming ("MAXLEN,<n>" or "MINID,<ms>"), ARGV[5] and ARGV[6] the key formats of a
member's sessions at final units and of its open sessions (string.format of the id's byte
length and the id: a group's credit or offer asks its members' sessions too), then the
operation's arguments:
  CREATE  initial_balance credit_limit bucket_limit low_balance_thresholds ("t1,t2" or "")
          plan member_limit ("": none; a member's only) [bucket fields x6]...
          -> account | "EXISTS" | "TOO_MANY_BUCKETS" | "NO_GROUP" (a member's group)
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
  SUBSCRIBE, CANCEL, RENEW, PLAN_DUE: recurring offers and scheduled plan changes, see
          subscriptions.lua
  LIMIT   member_limit ("": none)          -> account | "UNKNOWN" | "NOT_MEMBER"
          (a member's TOPUP, ADJUST, BUCKET, PURCHASE, SUBSCRIBE: "MEMBER|<group id>", its
          money and allowances being the group's; see groups.lua)
  GET     -> account | "UNKNOWN"
where account is { status ("OK", or "DUPLICATE" for a top-up or adjustment id applied
before with the same amount; another amount is a CONFLICT naming the first), account
fields, buckets (live ones: expired ones are not listed), usage, open session count,
subscriptions, a member's group's account fields (else empty), a group's member ids },
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
  event_counter_key, account_index_key, adjustments_key, cdrs_key, purchases_key,
  subscriptions_key, renewals_key, money_key, members_key = unpack(KEYS, 1, 16)
-- (one argument per line, named as server/contract.py AdminArgs names it)
local op = ARGV[1]
local account_id = ARGV[2]
local now_ms = ARGV[3]
local event_trim = ARGV[4]
local member_final_key_format = ARGV[5]
local member_sessions_key_format = ARGV[6]
local trim_strategy, trim_threshold = string.match(event_trim, '^(%u+),(%d+)$')

-- A new bucket, numbered in its account (a session's reservation names the bucket by
-- this serial: an id can come back after its bucket expired).
local function bucket_value(rg, units, expires, priority, kind)
  local serial = redis.call('HINCRBY', account_key, 'bucket_serial', 1)
  return table.concat({ rg, units, expires, priority, units, kind, serial, 0 }, '|')
end

local function text(number) return string.format('%d', number) end

local function expired(value)
  local expires = tonumber(string.match(value, '^[^|]*|[^|]*|([^|]*)|'))
  return expires ~= 0 and expires <= math.floor(now_ms / 1000)
end

-- One event per stream entry here (charge.lua packs a request's events into one, see its
-- KEYS[7]): `event` is "<type>|<field>|<value>|..." of numbers only; the client's own
-- strings (a top-up id, session ids) go in fields of the entry, which every event of an
-- entry carries.
local function notify_of(account, event, ...)
  redis.call('XADD', events_key, trim_strategy, '~', trim_threshold, '*',
    'a', account, 'ts', now_ms, 'n', redis.call('INCR', event_counter_key), 'e', event, ...)
end
local function notify(event, ...) notify_of(account_id, event, ...) end

local exists = redis.call('EXISTS', account_key) == 1
-- a member of a shared group: its money and allowances are its group's
local is_member = money_key ~= account_key

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
    redis.call('HGETALL', usage_key), redis.call('SCARD', sessions_key),
    redis.call('HGETALL', subscriptions_key),
    is_member and redis.call('HGETALL', money_key) or {},
    is_member and {} or redis.call('SMEMBERS', members_key) }
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

-- The account's sessions held at final units (hash `key`) asked to re-authorise, for the
-- rating groups they hold them for; then held no more.
local function ask_final_sessions(account, key)
  local held = redis.call('HGETALL', key)
  for i = 1, #held, 2 do
    for rg in string.gmatch(held[i + 1], '[^,]+') do
      notify_of(account, 'reauthorization_needed|rg|' .. rg, 's', held[i])
    end
  end
  redis.call('DEL', key)
end

-- Calls fn(member id, its key of the format) for each of a group's members (none for a
-- member or an account without members).
local function each_member(key_format, fn)
  if is_member then return end
  for _, member in ipairs(redis.call('SMEMBERS', members_key)) do
    fn(member, string.format(key_format, #member, member))
  end
end

-- A top-up or a credit: every session held at its final units should ask again, the
-- group's members' too (they draw on the same money).
local function ask_reauthorization()
  ask_final_sessions(account_id, final_key)
  each_member(member_final_key_format, ask_final_sessions)
end

-- A session's rating groups: its fields RG_STATE_FIELD (creditline/store/contract.py
-- SESSION_RATING_GROUP_PREFIX, as charge.lua writes them)
local RG_STATE_FIELD = '^g:(.+)$'

-- The account's open sessions (set `key`) asked again for every rating group they hold.
local function ask_sessions(account, key)
  for _, session_key in ipairs(redis.call('SMEMBERS', key)) do
    local session_id = redis.call('HGET', session_key, 'session')
    for _, field in ipairs(redis.call('HKEYS', session_key)) do
      local rg = string.match(field, RG_STATE_FIELD)
      if rg then notify_of(account, 'reauthorization_needed|rg|' .. rg, 's', session_id) end
    end
  end
end

-- A plan change, an offer bought or renewed: every open session should ask again for
-- every rating group it holds (its prices or quotas changed), a group's members' too, and
-- the sessions held at final units are held no more.
local function ask_open_sessions_again()
  ask_sessions(account_id, sessions_key)
  each_member(member_sessions_key_format, ask_sessions)
  redis.call('DEL', final_key)
  each_member(member_final_key_format, function(_, key) redis.call('DEL', key) end)
end

-- The account's state set; barring it announced (its open sessions must end: a Diameter
-- front end aborts them), once, when it was not barred already.
local function set_state(state, cause)
  local before = redis.call('HGET', account_key, 'state')
  redis.call('HSET', account_key, 'state', state)
  if state == 'barred' and before ~= 'barred' then
    notify('account_barred', 'cause', cause)
  end
end

-- The account's plan now: its plan, or the one scheduled from an instant passed already
-- (as charge.lua reads it), or the catalogue's default for an account made before plans.
local function plan_now(default_plan)
  local fields = redis.call('HMGET', account_key, 'plan', 'next_plan', 'next_plan_from_ms')
  if fields[2] and tonumber(now_ms) >= tonumber(fields[3]) then return fields[2] end
  return fields[1] or default_plan
end

-- Refused ("NOT_SOLD|<plan>") unless the account's plan is one of `plans` ("p1,p2").
local function not_sold(plans, default_plan)
  local plan = plan_now(default_plan)
  if string.find(',' .. plans .. ',', ',' .. plan .. ',', 1, true) then return nil end
  return 'NOT_SOLD|' .. plan
end

-- The money a payment may take: the balance less what open sessions hold, and the credit
-- limit when `with_credit`.
local function available_money(with_credit)
  local fields = redis.call('HMGET', account_key, 'balance', 'credit_limit', 'reserved')
  return fields[1] - fields[3] + (with_credit and fields[2] or 0)
end

-- An offer's sale refused (not sold with the plan, or "UNAFFORDABLE|<available>"), or nil.
local function sale_refusal(plans, default_plan, price, with_credit)
  local refusal = not_sold(plans, default_plan)
  if refusal then return refusal end
  local available = available_money(with_credit)
  if available < price then return 'UNAFFORDABLE|' .. text(available) end
  return nil
end

-- A CDR of money the account paid for an offer (no session): a purchase, a fee.
local function offer_record(kind, record_id, offer_id, charged, balance, cause, result)
  redis.call('XADD', cdrs_key, '*', 'account', account_id, 'session', record_id,
    'ended_ms', now_ms, 'balance_after', balance, 'kind', kind, 'started_ms', now_ms,
    'cause', cause, 'result', result or '2001', 'charged', charged, 'items', '',
    'offer', offer_id)
end

