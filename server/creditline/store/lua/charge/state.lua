-- charge.lua, part 5 of 9 (after arguments.lua; see prelude.lua)
-- ---------------------------------------------------------------- state
-- A hash as a table field -> value. Read as a RESP3 map, it arrives as that table, built by
-- Redis; as RESP2 it would be a flat array for a loop here to copy (-2.5 % instructions).
-- (Redis sets RESP2 again at the start of every script.)
local function hash(key)
  redis_setresp(3)
  local map = redis_call('HGETALL', key).map
  redis_setresp(2)
  return map
end

-- The account, one request's (set by read_account): the fields the script reads, and
-- those it may change as read (field -> value). For a group's member they are the group's
-- (money_key), and `member` holds the member's own.
local balance, balance_at_start, reserved, credit_limit, barred, low_balance, account_plan
local plan_change_due  -- a plan change scheduled for now or before: made by write_account
local account, account_changes  -- field -> increment
-- A member of a shared group (nil: an account of its own): its reserved, charged,
-- refunded and spent (in period) as numbers, its limit (nil: none), changed.
local member

-- The plan in force: the account's, or the one scheduled when its instant has come
-- (creditline/store/contract.py plan_in_force).
local function set_plan(plan, next_plan, next_plan_from_ms)
  account_plan = plan or default_plan  -- (accounts made before plans: the default)
  plan_change_due = next_plan ~= false and now_ms >= num(next_plan_from_ms)
  if plan_change_due then account_plan = next_plan end
end

-- The money fields, from the hash that holds them (HMGET result from 'balance' on).
local function set_money(read)
  balance, reserved, credit_limit = num(read[1]), num(read[2]), num(read[3])
  balance_at_start = balance
  barred = read[4] == 'barred'
  low_balance = read[5]
  account = { balance = balance, reserved = reserved, charged = read[6], refunded = read[7] }
  account_changes = {}
end

-- A member's own fields and its group's money; the refusal when either is missing.
local function read_member()
  local own = redis_call('HMGET', account_key, 'reserved', 'state', 'charged', 'refunded',
    'plan', 'next_plan', 'next_plan_from_ms', 'limit', 'spent', 'spent_period')
  if not own[1] then return USER_UNKNOWN .. ';!unknown account' end
  local money = redis_call('HMGET', money_key, 'balance', 'reserved', 'credit_limit',
    'state', 'low_balance', 'charged', 'refunded')
  if not money[1] then return USER_UNKNOWN .. ';!unknown account (its group is gone)' end
  set_money(money)
  barred = barred or own[2] == 'barred'
  set_plan(own[5], own[6], own[7])
  -- (no period given: a supervision close, which charges nothing: the count stays as is)
  local period = member_period ~= '' and member_period or own[10]
  member = { reserved = num(own[1]), charged = num(own[3]), refunded = num(own[4]),
    spent = own[10] == period and num(own[9]) or 0, period = period,
    limit = own[8] and num(own[8]), changed = false }
  return nil
end

-- Reads the account; the refusal when there is none. (HMGET of the fields the script
-- uses: the whole hash as a map cost ~10k instructions more per request.)
local function read_account()
  member = nil
  if money_key ~= account_key then return read_member() end
  local read = redis_call('HMGET', account_key, 'balance', 'reserved', 'credit_limit',
    'state', 'low_balance', 'charged', 'refunded', 'plan', 'next_plan', 'next_plan_from_ms')
  if not read[1] then return USER_UNKNOWN .. ';!unknown account' end
  set_money(read)
  set_plan(read[8], read[9], read[10])
  return nil
end

-- The answer when the server priced the request by another plan than the account's (it
-- prices it again by that one: creditline/store/contract.py PLAN_RETRY_ANSWER), else nil.
-- No plan assumed (''): a supervision close, which prices nothing.
local PLAN_RETRY_ANSWER = '0;!plan='
local function plan_retry()
  if assumed_plan == '' or assumed_plan == account_plan then return nil end
  return PLAN_RETRY_ANSWER .. account_plan
end

-- A member's share of a change to its group's money: what it holds and spent.
local MEMBER_SPENDING = { charged = 1, refunded = -1 }
local function member_add(field, delta)
  if field == 'reserved' then
    member.reserved = member.reserved + delta
  elseif MEMBER_SPENDING[field] then
    member[field] = member[field] + delta
    member.spent = member.spent + MEMBER_SPENDING[field] * delta
  else
    return
  end
  member.changed = true
end

local function account_add(field, delta)
  if delta ~= 0 then
    account_changes[field] = (account_changes[field] or 0) + delta
    if member then member_add(field, delta) end
  end
end
local function available_money()
  return balance + credit_limit - reserved
end

-- What a grant or a debit may take: the money available, and for a member with a limit
-- no more than the limit leaves (what it spent in the period and holds counted). Usage
-- reported beyond a grant is charged from the money alone (charge_usage): a member's
-- spending passes its limit by at most that overrun.
local function grant_money()
  local money = available_money()
  if member and member.limit then
    money = math_min(money, member.limit - math_max(0, member.spent) - member.reserved)
  end
  return money
end

-- Units rated in the billing period, per block of a tariff with tiers: where its tiers
-- stand. Another period's count is stale: the new period starts from 0. (One request's:
-- reset by read_buckets, made at the first use.)
local period_units_by_rg
local function period_units(block)
  if block.period == '-' then return 0 end
  period_units_by_rg = period_units_by_rg or {}
  local known = period_units_by_rg[block.rg]
  if known == nil then
    local stored = redis_call('HMGET', usage_key, block.rg .. ':period',
      block.rg .. ':period_units')
    known = 0
    if stored[1] == block.period then known = base_tonumber(stored[2]) or 0 end
    period_units_by_rg[block.rg] = known
  end
  return known
end

local function add_period_units(block, units)
  if block.period == '-' or units <= 0 then return end
  local total = period_units(block) + units
  period_units_by_rg[block.rg] = total
  redis_call('HSET', usage_key, block.rg .. ':period', block.period,
    block.rg .. ':period_units', int(total))
end

-- Unit buckets: parsed once; changes are kept in memory and written at the end.
-- Expired buckets are removed (those with units left announced) when the script writes;
-- the units open sessions had reserved from them go with them.
local buckets_by_rg, buckets_by_serial, expired_buckets  -- (one request's)
local BUCKET_VALUE = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$'

-- The order buckets are drawn in: priority, then the earliest expiry, then the id.
local function bucket_order(a, b)
  if a.priority ~= b.priority then return a.priority < b.priority end
  local ea, eb = a.expires, b.expires
  if ea == 0 then ea = math_huge end
  if eb == 0 then eb = math_huge end
  if ea ~= eb then return ea < eb end
  return a.id < b.id
end

-- What an account without buckets has: never written (only read_buckets' loop adds).
local NO_BUCKETS = {}

local function read_buckets()
  period_units_by_rg = nil  -- (made by period_units, for tariffs with tiers only)
  local raw = redis_call('HGETALL', buckets_key)
  if #raw == 0 then  -- (most accounts: no tables to make)
    buckets_by_rg, buckets_by_serial, expired_buckets = NO_BUCKETS, NO_BUCKETS, NO_BUCKETS
    return
  end
  buckets_by_rg, buckets_by_serial, expired_buckets = {}, {}, {}
  for i = 1, #raw, 2 do
    local rg, remaining, expires, priority, initial, unit, serial, held =
      string_match(raw[i + 1], BUCKET_VALUE)
    expires = num(expires)
    if expires == 0 or expires > now_s then
      local b = { id = raw[i], rg = rg, remaining = num(remaining), expires = expires,
        priority = num(priority), initial = initial, kind = unit, serial = serial,
        reserved = num(held) }
      local list = buckets_by_rg[rg] or {}
      list[#list + 1] = b
      buckets_by_rg[rg] = list
      buckets_by_serial[serial] = b
    else
      expired_buckets[#expired_buckets + 1] = { id = raw[i], rg = rg, remaining = remaining }
    end
  end
  for _, list in base_pairs(buckets_by_rg) do table_sort(list, bucket_order) end
end

-- A bucket's units that no open session holds.
local function free_units(b) return math_max(0, b.remaining - b.reserved) end

-- (Most accounts hold no bucket of a rating group: no loop, and no empty list, then.)
local function bucket_units_free(rg)
  local list, total = buckets_by_rg[rg], 0
  if not list then return 0 end
  for _, b in base_ipairs(list) do total = total + free_units(b) end
  return total
end

-- Takes up to `units` free units, in the buckets' order: used (consume) or reserved
-- (hold). Returns the units taken, the reservations "serial=units,..." (hold) and the
-- earliest expiry (unix s, 0: none) among the buckets taken from.
local function take_buckets(rg, units, hold)
  local list = buckets_by_rg[rg]
  if not list or units <= 0 then return 0, '', 0 end
  local taken, held, earliest = 0, {}, 0
  for _, b in base_ipairs(list) do
    if taken >= units then break end
    local take = math_min(free_units(b), units - taken)
    if take > 0 then
      if hold then
        b.reserved = b.reserved + take
        held[#held + 1] = b.serial .. '=' .. int(take)
      else
        b.remaining = b.remaining - take
      end
      b.dirty = true
      taken = taken + take
      if b.expires ~= 0 and (earliest == 0 or b.expires < earliest) then
        earliest = b.expires
      end
    end
  end
  return taken, table_concat(held, ','), earliest
end

local function consume_buckets(rg, units)
  return (take_buckets(rg, units, false))
end

-- Gives back reservations "serial=units,..."; those of buckets gone since are gone.
local function release_buckets(held)
  for serial, units in string_gmatch(held, '([^,=]+)=(%d+)') do
    local b = buckets_by_serial[serial]
    if b then
      b.reserved = math_max(0, b.reserved - num(units))
      b.dirty = true
    end
  end
end

local function write_buckets()
  for _, list in base_pairs(buckets_by_rg) do
    for _, b in base_ipairs(list) do
      if b.dirty then
        redis_call('HSET', buckets_key, b.id, table_concat({ b.rg, int(b.remaining),
          int(b.expires), int(b.priority), b.initial, b.kind, b.serial, int(b.reserved) },
          '|'))
      end
    end
  end
end

-- One HSET of the changed fields' new values (the script read them all, and nothing else
-- runs meanwhile): one call instead of one HINCRBY per field.
-- A member's own fields, when they changed: what it holds and what it spent in the period.
local function write_member()
  if not member.changed then return end
  redis_call('HSET', account_key, 'reserved', int(member.reserved), 'charged',
    int(member.charged), 'refunded', int(member.refunded), 'spent', int(member.spent),
    'spent_period', member.period)
end

local function write_plan_change()
  redis_call('HSET', account_key, 'plan', account_plan)
  redis_call('HDEL', account_key, 'next_plan', 'next_plan_from_ms')
end

local function write_account()
  local flat = {}
  for field, delta in base_pairs(account_changes) do
    flat[#flat + 1] = field
    flat[#flat + 1] = int((base_tonumber(account[field]) or 0) + delta)  -- (fields of read_account)
  end
  if #flat > 0 then redis_call('HSET', money_key, base_unpack(flat)) end
  if member then write_member() end
  -- (until then each request took the scheduled plan itself)
  if plan_change_due then write_plan_change() end
end

-- A rating group's state in a session hash (field RG_STATE_PREFIX .. block id), as
-- creditline/store/contract.py SESSION_RATING_GROUP_* defines it: six numbers, binary
-- (units used, money charged, units paid from buckets, money uncharged, money reserved,
-- bucket units reserved), then "|"-separated the buckets' rating group, the tariff and the
-- bucket holds ("serial=units,..."). Binary: no number parsed or formatted as text, and
-- one field per rating group instead of nine (~40k instructions a request less).
local RG_STATE_PREFIX, RG_STATE_FIELD = 'g:', '^g:(.+)$'
local RG_STATE_FORMAT, RG_STATE_BYTES = '<dddddd', 48
local RG_STATE_TEXTS = '^([^|]*)|([^|]*)|(.*)$'

local function new_rg_state()
  return { u = 0, c = 0, fb = 0, x = 0, m = 0, b = 0, k = '', tf = '', bl = '', legacy = false }
end

local function decode_rg_state(packed)
  local u, c, fb, x, m, b = struct_unpack(RG_STATE_FORMAT, packed)
  local k, tf, bl = string_match(packed, RG_STATE_TEXTS, RG_STATE_BYTES + 1)
  return { u = u, c = c, fb = fb, x = x, m = m, b = b, k = k, tf = tf, bl = bl, legacy = false }
end

local function encode_rg_state(state)
  return struct_pack(RG_STATE_FORMAT, state.u, state.c, state.fb, state.x, state.m, state.b)
    .. state.k .. '|' .. state.tf .. '|' .. state.bl
end

-- A session written by a version before the packed state keeps a rating group in fields
-- of their own (u:, c:, fb:, x:, m:, b:, bl:, k:, tf:, and r:): read once, written back
-- packed, those fields deleted (delete_legacy_rg_fields), so an upgrade loses nothing.
local LEGACY_RG_FIELDS = { 'u:', 'c:', 'fb:', 'x:', 'm:', 'b:', 'bl:', 'k:', 'tf:', 'r:' }
local function legacy_rg_state(fields, rg)
  local state = new_rg_state()
  state.u, state.c = num(fields['u:' .. rg] or 0), num(fields['c:' .. rg] or 0)
  state.fb, state.x = num(fields['fb:' .. rg] or 0), num(fields['x:' .. rg] or 0)
  state.m, state.b = num(fields['m:' .. rg] or 0), num(fields['b:' .. rg] or 0)
  state.k, state.tf, state.bl = fields['k:' .. rg], fields['tf:' .. rg] or '',
    fields['bl:' .. rg] or ''
  state.legacy = true
  return state
end

local function delete_legacy_rg_fields(key, rg)
  local names = {}
  for i, prefix in base_ipairs(LEGACY_RG_FIELDS) do names[i] = prefix .. rg end
  redis_call('HDEL', key, base_unpack(names))
end

local function record_usage(rg, used, charged, from_buckets, uncharged)
  if used > 0 then redis_call('HINCRBY', usage_key, rg .. ':used', int(used)) end
  if charged ~= 0 then redis_call('HINCRBY', usage_key, rg .. ':charged', int(charged)) end
  if from_buckets > 0 then
    redis_call('HINCRBY', usage_key, rg .. ':from_buckets', int(from_buckets))
  end
  if uncharged > 0 then
    redis_call('HINCRBY', usage_key, rg .. ':uncharged', int(uncharged))
  end
end

local function charge_money(amount)
  balance = balance - amount
  account_add('balance', -amount)
  account_add('charged', amount)
end

