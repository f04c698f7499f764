--[[
charge.lua: every charging request (session Initial / Update / Terminate, one-shot
events, and the closing of a stale session by supervision) in one atomic step: one EVALSHA, one round trip. It reads and checks everything
first, then writes; a refusal writes nothing. The charge notifications and the CDRs are
written here too, in the same step: one exists if and only if its charge happened.

KEYS (all under the account's partition hash tag, so the script runs on Redis Cluster):
  KEYS[1] account hash    balance, credit_limit, state, reserved, initial, topped_up,
                          charged, refunded, adjusted, low_balance (thresholds, "t1,t2,...")
  KEYS[2] request key     session hash (kinds I/U/T: per rating group r: units rated, paid
                          by money, c: money charged, ru: and rc: units and money refunded
                          since, ...) or event answer string (kind E: "<request number>|
                          <answer>", a debit's then "|<refunds>": "<rg>=<units>:<money>,..."
                          refunded of it)
  KEYS[3] buckets hash    bucket id -> "rg|remaining|expires_at_s|priority|initial|kind|
                          serial|reserved" (server/store.py BUCKET_FIELDS): serial numbers
                          the bucket in its account (ids can be reused after an expiry),
                          reserved counts its units held by open sessions
  KEYS[4] usage hash      <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged,
                          <rg>:period and <rg>:period_units (units rated in the billing
                          period, which the tiers count; tariffs with tiers only)
  KEYS[5] open sessions   set of the keys of the account's open sessions
  KEYS[6] final sessions  hash: id of an open session holding final units -> its rating
                          groups at final units ("rg,rg")
  KEYS[7] event stream    the partition's charge notifications: one entry per request
                          that made any, fields a (account), s (session), ts (unix ms),
                          n (the number of its last event) and e (its events in order,
                          separated by ';', each "<type>|<field>|<value>|..."; no value
                          holds ';' or '|': rating groups, tariff ids and numbers only;
                          the client's own strings go in fields of the entry)
  KEYS[8] CDR stream      the partition's charging data records
  KEYS[9] rates hash      <rg> -> "fast|slow|at_ms|since_ms|spike" (usage spike detection)
  KEYS[10] event counter  the partition's count of notifications ever written: each one
                          has its number, so a subscriber can tell whether retention
                          dropped any after its cursor
  KEYS[11] deadlines      the partition's sorted set: session key -> supervision deadline
                          (unix ms); a session with no request by then is closed ("S")
  KEYS[12], KEYS[13]      REFUND only: the event answer and the session hash of the id the
                          refund names (whichever exists holds the charge it reverses)
  KEYS[12]                kinds I, T, S on one Redis server (not a cluster): the session
                          id's claim, in the id's own partition (server/lua/claim.lua: its
                          format): an Initial refuses an id another account holds open and
                          takes the claim, a close gives it back; on a cluster the server
                          does this in steps of its own, and no KEYS[12] is given

ARGV:
  [1] kind: "I", "U", "T" (session), "E" (event), or "S" (close the session if its
      supervision deadline has passed: charges nothing more, releases what it holds)
  [2] request number
  [3] account id
  [4] session id
  [5] now, unix ms (server clock: bucket expiry, records)
  [6] event time, unix ms (network clock: usage rates for spike detection)
  [7] answer retention, seconds: how long a closed session or an event answer is kept
      so that a retransmission gets the same answer
  [8] event action (kind E): "DEBIT", "REFUND", "CHECK", "PRICE"; "-" otherwise
  [9] event stream trimming, "MAXLEN,<entries>" or "MINID,<oldest unix ms kept>"
  [10] usage spike detection "fast window s,slow window s,factor"
  [11] supervision time, ms: a session with no request for this long is closed
  [12] REFUND: the session id of the event or session whose charge it reverses; else ""
  [13] number of rating-group blocks, then each block as:
      block id (rating group, or "<rating group>.<service id>"), the rating group whose
      unit buckets apply, tariff id, tariff status ("ok" / "free" / "none"), requested
      units (-1: none), used units, unit kind ("t" time, "v" volume, "s" service
      specific, "-" no tariff), final unit action (FinalUnitAction number), and when the
      status is "ok" the rate table
      (server/rating.py RateTable.script_args): connect fee, first increment units,
      following increment units, time-based 0/1, billing period ("-": no tiers), tier
      count T and T tier starts (units of the billing period), band count B and per band
      1 + (T + 1) prices (first increment; following increments below the first tier and
      in each tier), change count C and C pairs (seconds from the event time, band index
      from 0)

Return: the answer as one string "<code>;<block>;<block>...", complete in itself (a
retransmission is answered from it, whatever the retransmission carries; server/charging.py
decodes it). A session block is "block id,code,unit kind,granted,charged,final unit action
(0: none),seconds until the earliest expiry of the buckets the grant draws on (0: none)";
an event block is "block id,code,unit kind,units,amount,from_buckets", and an event answer
ends with ";B<balance>,<sufficient 0/1>". A refusal before any write is "<code>;!<reason>".
Retransmissions get the stored string unchanged.

Numbers are Lua doubles: every integer the caller passes is below 2^53 and costs
saturate at MAX_SAFE; integers are written back with %d (tostring would print 1e+15).
]]

local MAX_SAFE = 9007199254740991
local SUCCESS, DENIED, NOT_APPLICABLE, LIMIT_REACHED = 2001, 4010, 4011, 4012
local UNKNOWN_SESSION, INVALID_VALUE, USER_UNKNOWN, RATING_FAILED = 5002, 5004, 5030, 5031

-- Integers as text for Redis (%d: tostring would print 1e+15). Many are written more than
-- once per request (the time, the balance, zeros): each is formatted once, string.format
-- costs ~1,500 instructions.
local int_texts = { [0] = '0' }
local function int(x)
  local text = int_texts[x]
  if text == nil then
    text = string.format('%d', x)
    if x == x then int_texts[x] = text end  -- (NaN cannot be a key)
  end
  return text
end

-- ---------------------------------------------------------------- rating
-- Keep in step with server/rating.py (RateTable.schedule, PriceSchedule.cost /
-- max_units_within). A schedule is { connect_fee, segments }, over the session's
-- cumulative units; segment ends fall on the session's increment boundaries.

local MAX_SEGMENTS = 64

local function band_at(block, offset_s)
  local band = block.changes[1].band
  for _, change in ipairs(block.changes) do
    if change.offset_s > offset_s then break end
    band = change.band
  end
  return block.bands[band]
end

-- The prices at cumulative unit `units` of a schedule from `rated` (see schedule_from).
-- (Functions of their own rather than closures in schedule_from: making a closure per call
-- searches the script's open upvalues for each variable it uses.)
local function prices_at(block, rated, offset_s, units)
  local ahead = math.max(0, units - rated)
  if block.time_based then return band_at(block, offset_s + ahead) end
  return band_at(block, offset_s)
end

local function tier_at(block, rated, period_units, units)
  local position, tier = period_units + math.max(0, units - rated), 0
  for _, from_units in ipairs(block.tiers) do
    if from_units <= position then tier = tier + 1 end
  end
  return tier
end

-- The schedule for the units from `rated` on: unit `rated` is `offset_s` seconds from the
-- event time (time-based tariffs) and at `period_units` of the billing period. Segments
-- before `rated` are priced as at `rated`: paid already, they cancel out of every difference.
local function schedule_from(block, rated, period_units, offset_s)
  -- One band and no tiers (most tariffs): the same schedule wherever the session stands,
  -- built once per request and block; its only increment boundary is the first.
  local fixed = #block.tiers == 0 and #block.changes == 1
  if fixed and block.fixed_schedule then return block.fixed_schedule end
  local first, following = block.first, block.following
  local starts = { first }
  if not fixed then
    local seen = { [first] = true }
    local function add(units)
      local start = first
      if units > first then
        start = first + math.ceil((units - first) / following) * following
      end
      if not seen[start] then seen[start] = true; starts[#starts + 1] = start end
    end
    if block.time_based then
      for c = 2, #block.changes do
        local at = rated + block.changes[c].offset_s - offset_s
        if at > rated then add(at) end
      end
    end
    for _, from_units in ipairs(block.tiers) do
      if from_units > period_units then add(rated + from_units - period_units) end
    end
    table.sort(starts)
  end
  local segments = { { ending = first, increment = first,
    price = prices_at(block, rated, offset_s, 0)[1] } }
  local count = math.min(#starts, MAX_SEGMENTS - 1)
  for index = 1, count do
    local start = starts[index]
    local ending = math.huge
    if index < count then ending = starts[index + 1] end
    local tier = tier_at(block, rated, period_units, start)
    local price = prices_at(block, rated, offset_s, start)[2 + tier]
    local previous = segments[#segments]
    if previous.increment == following and previous.price == price then
      previous.ending = ending  -- same price as the segment before: one segment
    else
      segments[#segments + 1] = { ending = ending, increment = following, price = price }
    end
  end
  local schedule = { connect_fee = block.connect_fee, segments = segments }
  if fixed then block.fixed_schedule = schedule end
  return schedule
end

-- Price of the first `units` units counted from the start of the session (or event):
-- the connect fee once, then whole increments of each segment, the last one rounded up.
local function cost(schedule, units)
  if units <= 0 then return 0 end
  local total, start = schedule.connect_fee, 0
  for _, seg in ipairs(schedule.segments) do
    local stop = math.min(units, seg.ending)
    total = total + math.ceil((stop - start) / seg.increment) * seg.price
    if total >= MAX_SAFE then return MAX_SAFE end
    if units <= seg.ending then return total end
    start = seg.ending
  end
  return MAX_SAFE  -- units beyond the last segment have no price: unaffordable
end

-- The largest cumulative unit count n, at an increment boundary, with cost(n) <= budget.
local function max_units_within(schedule, budget)
  if budget < schedule.connect_fee then return 0 end
  local spent, start = schedule.connect_fee, 0
  for _, seg in ipairs(schedule.segments) do
    local increments = math.ceil((seg.ending - start) / seg.increment)
    local buyable = increments
    if seg.price > 0 then buyable = math.floor((budget - spent) / seg.price) end
    if buyable < increments then return start + buyable * seg.increment end
    if seg.ending == math.huge then return math.huge end
    spent = spent + increments * seg.price
    start = seg.ending
  end
  return start
end

-- Units beyond `from` (at most `wanted`) that `amount` more money pays for.
local function affordable_units(schedule, from, amount, wanted)
  if amount < 0 then amount = 0 end
  local reach = max_units_within(schedule, cost(schedule, from) + amount)
  return math.max(0, math.min(wanted, reach - from))
end

-- A number from a string that the caller (ARGV) or this script (%d, %.17g) wrote. Not
-- tonumber(): Lua 5.1's parses a string twice (lua_isnumber, then lua_tonumber), where
-- arithmetic parses it once (~450 instructions less; ~60 strings a request). Unlike
-- tonumber() it fails on anything that is not a number instead of returning nil.
local function num(text) return text + 0 end

-- The rate table of a block (server/rating.py RateTable.script_args), from ARGV[i] on;
-- returns the index of the argument after it. (Indexing ARGV directly: a closure call per
-- argument cost the script ~10 % of its instructions.)
local function read_rate_table(block, i)
  block.connect_fee, block.first, block.following =
    num(ARGV[i]), num(ARGV[i + 1]), num(ARGV[i + 2])
  block.time_based, block.period = ARGV[i + 3] == '1', ARGV[i + 4]
  local tiers, bands, changes = {}, {}, {}
  block.tiers, block.bands, block.changes = tiers, bands, changes
  i = i + 5
  for t = 1, num(ARGV[i]) do tiers[t] = num(ARGV[i + t]) end
  i = i + #tiers + 1
  local prices_per_band = #tiers + 2
  for b = 1, num(ARGV[i]) do
    local prices = {}
    for p = 1, prices_per_band do prices[p] = num(ARGV[i + p]) end
    bands[b] = prices
    i = i + prices_per_band
  end
  i = i + 1
  for c = 1, num(ARGV[i]) do
    changes[c] = { offset_s = num(ARGV[i + 1]), band = num(ARGV[i + 2]) + 1 }
    i = i + 2
  end
  return i + 1
end

-- ---------------------------------------------------------------- decoding the arguments
-- (After the rating functions: num() is one of them.)
local account_key, request_key, buckets_key, usage_key, sessions_key, final_key,
  events_key, cdrs_key, rates_key, event_counter_key, deadlines_key = unpack(KEYS, 1, 11)
-- (one argument per line, named as server/contract.py ChargeArgs names it: the tests hold
-- the two to each other)
local kind = ARGV[1]
local request_number = num(ARGV[2])
local account_id = ARGV[3]
local session_id = ARGV[4]
local now_ms = num(ARGV[5])
local event_time_ms = num(ARGV[6])
local retention_s = num(ARGV[7])
local event_action = ARGV[8]
local event_trim = ARGV[9]
local spike_detection = ARGV[10]
local supervision_ms = num(ARGV[11])
local refund_of = ARGV[12]
local block_count = num(ARGV[13])
local now_s = math.floor(now_ms / 1000)
local trim_strategy, trim_threshold = string.match(event_trim, '^(%u+),(%d+)$')
local spike_fast_s, spike_slow_s, spike_factor =
  string.match(spike_detection, '^(.-),(.-),(.-)$')
spike_fast_s, spike_slow_s, spike_factor = num(spike_fast_s), num(spike_slow_s),
  num(spike_factor)
local blocks = {}
do
  local i = 14
  for b = 1, block_count do
    -- (the fields as server/contract.py BLOCK_FIELDS orders them)
    local block = { rg = ARGV[i], bucket_rg = ARGV[i + 1], tariff = ARGV[i + 2],
      status = ARGV[i + 3], requested = num(ARGV[i + 4]), used = num(ARGV[i + 5]),
      unit = ARGV[i + 6], final_action = ARGV[i + 7] }
    i = i + 8
    if block.status == 'ok' then i = read_rate_table(block, i) end
    blocks[b] = block
  end
end

-- ---------------------------------------------------------------- state
-- A hash as a table field -> value. Read as a RESP3 map, it arrives as that table, built by
-- Redis; as RESP2 it would be a flat array for a loop here to copy (-2.5 % instructions).
-- (Redis sets RESP2 again at the start of every script.)
local function hash(key)
  redis.setresp(3)
  local map = redis.call('HGETALL', key).map
  redis.setresp(2)
  return map
end

local account = hash(account_key)
if account.balance == nil then return USER_UNKNOWN .. ';!unknown account' end
local balance = tonumber(account.balance)
local balance_at_start = balance
local reserved = tonumber(account.reserved)
local credit_limit = tonumber(account.credit_limit)
local barred = account.state == 'barred'
local account_changes = {}   -- field -> increment
local function account_add(field, delta)
  if delta ~= 0 then account_changes[field] = (account_changes[field] or 0) + delta end
end
local function available_money()
  return balance + credit_limit - reserved
end

-- Units rated in the billing period, per block of a tariff with tiers: where its tiers
-- stand. Another period's count is stale: the new period starts from 0.
local period_units_by_rg = {}
local function period_units(block)
  if block.period == '-' then return 0 end
  local known = period_units_by_rg[block.rg]
  if known == nil then
    local stored = redis.call('HMGET', usage_key, block.rg .. ':period',
      block.rg .. ':period_units')
    known = 0
    if stored[1] == block.period then known = tonumber(stored[2]) or 0 end
    period_units_by_rg[block.rg] = known
  end
  return known
end

local function add_period_units(block, units)
  if block.period == '-' or units <= 0 then return end
  local total = period_units(block) + units
  period_units_by_rg[block.rg] = total
  redis.call('HSET', usage_key, block.rg .. ':period', block.period,
    block.rg .. ':period_units', int(total))
end

-- Unit buckets: parsed once; changes are kept in memory and written at the end.
-- Expired buckets are removed (those with units left announced) when the script writes;
-- the units open sessions had reserved from them go with them.
local buckets_by_rg, buckets_by_serial, expired_buckets = {}, {}, {}
local BUCKET_VALUE = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$'
do
  local raw = redis.call('HGETALL', buckets_key)
  for i = 1, #raw, 2 do
    local rg, remaining, expires, priority, initial, unit, serial, held =
      string.match(raw[i + 1], BUCKET_VALUE)
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
  local function order(a, b)
    if a.priority ~= b.priority then return a.priority < b.priority end
    local ea, eb = a.expires, b.expires
    if ea == 0 then ea = math.huge end
    if eb == 0 then eb = math.huge end
    if ea ~= eb then return ea < eb end
    return a.id < b.id
  end
  for _, list in pairs(buckets_by_rg) do table.sort(list, order) end
end

-- A bucket's units that no open session holds.
local function free_units(b) return math.max(0, b.remaining - b.reserved) end

local function bucket_units_free(rg)
  local total = 0
  for _, b in ipairs(buckets_by_rg[rg] or {}) do total = total + free_units(b) end
  return total
end

-- Takes up to `units` free units, in the buckets' order: used (consume) or reserved
-- (hold). Returns the units taken, the reservations "serial=units,..." (hold) and the
-- earliest expiry (unix s, 0: none) among the buckets taken from.
local function take_buckets(rg, units, hold)
  local taken, held, earliest = 0, {}, 0
  for _, b in ipairs(buckets_by_rg[rg] or {}) do
    if taken >= units then break end
    local take = math.min(free_units(b), units - taken)
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
  return taken, table.concat(held, ','), earliest
end

local function consume_buckets(rg, units)
  return (take_buckets(rg, units, false))
end

-- Gives back reservations "serial=units,..."; those of buckets gone since are gone.
local function release_buckets(held)
  for serial, units in string.gmatch(held, '([^,=]+)=(%d+)') do
    local b = buckets_by_serial[serial]
    if b then
      b.reserved = math.max(0, b.reserved - num(units))
      b.dirty = true
    end
  end
end

local function write_buckets()
  for _, list in pairs(buckets_by_rg) do
    for _, b in ipairs(list) do
      if b.dirty then
        redis.call('HSET', buckets_key, b.id, table.concat({ b.rg, int(b.remaining),
          int(b.expires), int(b.priority), b.initial, b.kind, b.serial, int(b.reserved) },
          '|'))
      end
    end
  end
end

-- One HSET of the changed fields' new values (the script read them all, and nothing else
-- runs meanwhile): one call instead of one HINCRBY per field.
local function write_account()
  local flat = {}
  for field, delta in pairs(account_changes) do
    flat[#flat + 1] = field
    flat[#flat + 1] = int((tonumber(account[field]) or 0) + delta)
  end
  if #flat > 0 then redis.call('HSET', account_key, unpack(flat)) end
end

local function record_usage(rg, used, charged, from_buckets, uncharged)
  if used > 0 then redis.call('HINCRBY', usage_key, rg .. ':used', int(used)) end
  if charged ~= 0 then redis.call('HINCRBY', usage_key, rg .. ':charged', int(charged)) end
  if from_buckets > 0 then
    redis.call('HINCRBY', usage_key, rg .. ':from_buckets', int(from_buckets))
  end
  if uncharged > 0 then
    redis.call('HINCRBY', usage_key, rg .. ':uncharged', int(uncharged))
  end
end

local function charge_money(amount)
  balance = balance - amount
  account_add('balance', -amount)
  account_add('charged', amount)
end

-- ---------------------------------------------------------------- notifications
-- The request's events, written together as one stream entry by write_records.
local notifications = {}
-- notify(event_type, field, value, ...): the pairs as arguments, not in a table of their
-- own (one table per notification instead of two); every value is given (no nil).
local function notify(event_type, ...)
  local packed = { event_type, ... }
  for i = 3, #packed, 2 do
    if type(packed[i]) == 'number' then packed[i] = int(packed[i]) end
  end
  notifications[#notifications + 1] = table.concat(packed, '|')
end

-- Low-balance thresholds crossed downwards by this request: once per crossing.
local function notify_low_balance()
  if not account.low_balance or balance >= balance_at_start then return end
  for threshold in string.gmatch(account.low_balance, '[^,]+') do
    local t = tonumber(threshold)
    if balance_at_start >= t and balance < t then
      notify('low_balance', 'threshold', t, 'balance', balance)
    end
  end
end

-- Usage spike: two exponentially decaying usage rates per rating group, over a short and
-- a long window, on the network's event time. A spike is the short-window rate above
-- `factor` times the long-window one, once the account has a long window of history;
-- announced once, and again only after the rate has come back down.
local rate_changes = {}
local function observe_usage(rg, units)
  if units <= 0 or spike_factor <= 0 then return end
  local rates = rate_changes[rg]
  if not rates then
    -- "fast|slow|at_ms|since_ms|spike": one field per rating group, read with one call
    local stored = redis.call('HGET', rates_key, rg) or ''
    local fast, slow, at_ms, since_ms, spike =
      string.match(stored, '^([^|]+)|([^|]+)|([^|]+)|([^|]+)|([01])$')
    if fast then
      rates = { fast = num(fast), slow = num(slow), at_ms = num(at_ms),
        since_ms = num(since_ms), spike = spike == '1' }
    else  -- none yet
      rates = { fast = 0, slow = 0, at_ms = event_time_ms, since_ms = event_time_ms,
        spike = false }
    end
    rate_changes[rg] = rates
  end
  local elapsed_s = math.max(0, event_time_ms - rates.at_ms) / 1000
  rates.fast = rates.fast * math.exp(-elapsed_s / spike_fast_s) + units / spike_fast_s
  rates.slow = rates.slow * math.exp(-elapsed_s / spike_slow_s) + units / spike_slow_s
  rates.at_ms = math.max(rates.at_ms, event_time_ms)
  local history_s = (rates.at_ms - rates.since_ms) / 1000
  local high = history_s >= spike_slow_s and rates.fast > spike_factor * rates.slow
  if high and not rates.spike then
    notify('usage_spike', 'rg', rg, 'units', units,
      'rate_per_s', string.format('%.3f', rates.fast),
      'usual_rate_per_s', string.format('%.3f', rates.slow))
  end
  if high then rates.spike = true
  elseif rates.fast < spike_factor * rates.slow / 2 then rates.spike = false end
end

local function write_rates()
  local flat = {}
  for rg, r in pairs(rate_changes) do
    flat[#flat + 1] = rg
    flat[#flat + 1] = string.format('%.17g|%.17g|%d|%d|%s', r.fast, r.slow, r.at_ms,
      r.since_ms, r.spike and '1' or '0')
  end
  if #flat > 0 then redis.call('HSET', rates_key, unpack(flat)) end
end

-- All writes of the request that are not the charge itself: notifications, rates,
-- expired buckets. Called once, after every check has passed.
local function write_records()
  for _, b in ipairs(expired_buckets) do
    redis.call('HDEL', buckets_key, b.id)
    if num(b.remaining) > 0 then
      notify('bucket_expired', 'rg', b.rg, 'bucket', b.id, 'units', b.remaining)
    end
  end
  write_rates()
  notify_low_balance()
  if #notifications == 0 then return end
  -- One entry for all the request's events: n numbers its last event (they are n - k + 1
  -- .. n in the partition's count), e holds them in order. Why: an entry per event cost
  -- ~3.3 XADD and INCR per request here and as many entries for every reader to decode.
  local last = redis.call('INCRBY', event_counter_key, #notifications)
  local refunds = {}  -- the id a refund names: the client's string, a field of the entry
  if refund_of ~= '' then refunds = { 'refunds', refund_of } end
  redis.call('XADD', events_key, trim_strategy, '~', trim_threshold, '*', 'a', account_id,
    's', session_id, 'ts', int(now_ms), 'n', last, 'e', table.concat(notifications, ';'),
    unpack(refunds))
end

-- write_cdr(field, value, ...), like notify
local function write_cdr(...)
  redis.call('XADD', cdrs_key, '*', unpack({ 'account', account_id, 'session', session_id,
    'ended_ms', int(now_ms), 'balance_after', int(balance), ... }))
end

-- The request as a whole fails only when every rating group failed the same way. The
-- blocks' codes are folded as they come (no list of them): `shared` is the code of every
-- block so far, nil before the first, false once two differ.
local function fold_code(shared, code)
  if shared == nil or shared == code then return code end
  return false
end
local function overall_code(shared) return shared or SUCCESS end

-- ---------------------------------------------------------------- events
-- An event block as the answer carries it (see Return above).
local function event_part(block, code, units, amount, from_buckets)
  return ';' .. block.rg .. ',' .. code .. ',' .. block.unit .. ',' .. int(units) .. ','
    .. int(amount) .. ',' .. int(from_buckets)
end

-- A stored event answer "<number>|<answer>[|<refunds>]" -> number, answer, and the
-- refunds of a debit ("" before any; nil for other events: nothing to refund).
local function stored_event(stored)
  local number, answer, rest = string.match(stored, '^([^|]*)|([^|]*)(.*)$')
  if rest == '' then return number, answer, nil end
  return number, answer, string.sub(rest, 2)
end

-- REFUND: the charge it names, as a session's fields (r:, c:, ru:, rc: per rating group),
-- and whether it is an event's (else a session's); nil when no such charge is kept.
local function refund_target()
  local stored = redis.call('GET', KEYS[12])
  if not stored then
    local session_fields = hash(KEYS[13])
    if next(session_fields) == nil then return nil end
    return session_fields, false
  end
  local _, answer, refunds = stored_event(stored)
  local fields = {}
  if not refunds then return fields, true end  -- not a debit
  -- a debit's blocks "block id,code,unit kind,units,amount,from buckets", after the code
  for rg, units, amount, from_buckets in
      string.gmatch(answer, ';([^;,]+),%d+,[^,;]+,(%d+),(%d+),(%d+)') do
    fields['r:' .. rg], fields['c:' .. rg] = num(units) - num(from_buckets), num(amount)
  end
  for rg, units, amount in string.gmatch(refunds, '([^,=]+)=(%d+):(%d+)') do
    fields['ru:' .. rg], fields['rc:' .. rg] = num(units), num(amount)
  end
  return fields, true
end

-- REFUND: what it gave back, kept with the charge it names: a session's fields, or the
-- event's stored answer rewritten (its expiry kept) with the refunds after it.
local function record_refunds(target, of_event, refunded)
  if not of_event then
    for rg, r in pairs(refunded) do
      redis.call('HINCRBY', KEYS[13], 'ru:' .. rg, int(r.units))
      redis.call('HINCRBY', KEYS[13], 'rc:' .. rg, int(r.amount))
    end
    return
  end
  for rg, r in pairs(refunded) do
    target['ru:' .. rg] = num(target['ru:' .. rg] or 0) + r.units
    target['rc:' .. rg] = num(target['rc:' .. rg] or 0) + r.amount
  end
  local parts = {}
  for field, units in pairs(target) do
    local rg = string.match(field, '^ru:(.+)$')
    if rg then parts[#parts + 1] = rg .. '=' .. int(units) .. ':' .. int(target['rc:' .. rg]) end
  end
  local number, answer = stored_event(redis.call('GET', KEYS[12]))
  redis.call('SET', KEYS[12], number .. '|' .. answer .. '|' .. table.concat(parts, ','),
    'KEEPTTL')
end

-- REFUND: the money each block gets back, or nil and why the refund is refused. Only
-- money is refunded (units paid from buckets are not given back), at most what the named
-- charge took for the rating group minus what was refunded of it already: a refund of all
-- the units still charged returns exactly the money still charged, a part of them the
-- price of the charge's last units at the refund's prices.
local function refund_amounts(target)
  local amounts = {}
  for index, block in ipairs(blocks) do
    local where, rg = 'rating_groups[' .. (index - 1) .. ']', block.rg
    if block.status == 'ok' then
      local units_left = num(target['r:' .. rg] or 0) - num(target['ru:' .. rg] or 0)
      local money_left = num(target['c:' .. rg] or 0) - num(target['rc:' .. rg] or 0)
      if units_left <= 0 or money_left <= 0 then
        return nil, where .. ': the charge named by refund_of_session_id has no money ' ..
          'left to refund for this rating group'
      end
      local units = block.requested
      if units <= 0 or units > units_left then
        return nil, where .. '.requested: ' .. int(units) .. ' units; 1..' ..
          int(units_left) .. ' of the named charge are left to refund'
      end
      local amount = money_left
      if units < units_left then
        local schedule = schedule_from(block, 0, period_units(block), 0)
        amount = math.min(money_left,
          cost(schedule, units_left) - cost(schedule, units_left - units))
      end
      amounts[index] = amount
    end
  end
  return amounts
end

-- The two kinds of request are handled at the script's top level, not in a function each:
-- a function would be made anew on every request, searching the list of the script's
-- captured locals once for each it uses, and would reach the request's state through
-- upvalues rather than registers (-2 % instructions per request against making only the
-- function that runs).
if kind == 'E' then
  local stored = redis.call('GET', request_key)
  if stored then
    local stored_number, stored_answer = stored_event(stored)
    stored_number = num(stored_number)
    if stored_number == request_number then return stored_answer end
    if request_number < stored_number then
      return INVALID_VALUE .. ';!request number lower than the last one processed'
    end
  end
  if barred and event_action == 'DEBIT' then
    return DENIED .. ';!account is barred'
  end
  local target, of_event, refunds
  if event_action == 'REFUND' then
    local reason
    target, of_event = refund_target()
    if not target then
      return INVALID_VALUE .. ';!refund_of_session_id: no charge of that id is kept ' ..
        '(none made, or it ended more than answer_retention_s ago); a credit that ' ..
        'reverses no charge is an Admin adjustment'
    end
    refunds, reason = refund_amounts(target)
    if not refunds then return INVALID_VALUE .. ';!' .. reason end
  end
  local parts, shared_code, sufficient = '', nil, 1  -- parts: ";<block>" per block
  local cdr_items, cdr_total = {}, 0
  local refunded = {}  -- REFUND: rating group -> { units, amount }
  for index, block in ipairs(blocks) do
    local code, amount, from_buckets = SUCCESS, 0, 0
    local units = block.requested
    if block.status == 'none' then
      code = RATING_FAILED
    elseif block.status == 'free' then
      code = NOT_APPLICABLE
    elseif event_action == 'PRICE' then
      amount = cost(schedule_from(block, 0, period_units(block), 0), units)
    elseif event_action == 'REFUND' then
      amount = refunds[index]
      balance = balance + amount
      account_add('balance', amount)
      account_add('refunded', amount)
      record_usage(block.rg, 0, -amount, 0, 0)
      refunded[block.rg] = { units = units, amount = amount }
      notify('event_refunded', 'rg', block.rg, 'units', units, 'amount', amount,
        'balance', balance)
      cdr_items[#cdr_items + 1] = block.rg .. '|' .. block.tariff .. '|' .. int(units)
        .. '|' .. int(-amount) .. '|0|0'
      cdr_total = cdr_total - amount
    else  -- DEBIT or CHECK: buckets first, then money
      from_buckets = math.min(units, bucket_units_free(block.bucket_rg))
      amount = cost(schedule_from(block, 0, period_units(block), 0), units - from_buckets)
      if amount > available_money() then
        code, sufficient = LIMIT_REACHED, 0
        if event_action == 'DEBIT' then  -- nothing charged: the answer says 0
          from_buckets, amount = 0, 0
          notify('credit_exhausted', 'rg', block.rg)
        end
      elseif event_action == 'DEBIT' then
        consume_buckets(block.bucket_rg, from_buckets)
        charge_money(amount)
        record_usage(block.rg, units, amount, from_buckets, 0)
        add_period_units(block, units - from_buckets)
        observe_usage(block.rg, units)
        notify('event_charged', 'rg', block.rg, 'units', units, 'amount', amount,
          'from_buckets', from_buckets, 'balance', balance)
        cdr_items[#cdr_items + 1] = block.rg .. '|' .. block.tariff .. '|' .. int(units)
          .. '|' .. int(amount) .. '|' .. int(from_buckets) .. '|0'
        cdr_total = cdr_total + amount
      end
    end
    shared_code = fold_code(shared_code, code)
    parts = parts .. event_part(block, code, units, amount, from_buckets)
  end
  local answer = overall_code(shared_code)
  if parts ~= '' then answer = answer .. parts end
  answer = answer .. ';B' .. int(balance) .. ',' .. sufficient
  if event_action ~= 'DEBIT' and event_action ~= 'REFUND' then return answer end
  write_buckets()
  write_account()
  write_records()
  if #cdr_items > 0 then
    write_cdr('kind', (event_action == 'DEBIT') and 'event' or 'refund',
      'started_ms', int(event_time_ms), 'cause', 'event', 'result', answer:match('^%d+'),
      'charged', int(cdr_total), 'items', table.concat(cdr_items, ';'), unpack(
      event_action == 'REFUND' and { 'refunds', refund_of } or {}))
  end
  if target then record_refunds(target, of_event, refunded) end
  -- a debit's answer ends with '|': its refunds go there (see stored_event)
  local refundable = (event_action == 'DEBIT') and '|' or ''
  redis.call('SET', request_key, int(request_number) .. '|' .. answer .. refundable, 'EX',
    retention_s)
  return answer
end

-- ---------------------------------------------------------------- sessions
-- (kinds I, U, T and S: everything below)

-- The CDR of a closed session: one item per rating group it charged or reserved.
local function write_session_cdr(session, cause, result)
  local items, total = {}, 0
  for field, _ in pairs(session) do
    local rg = string.match(field, '^k:(.+)$')
    if rg then
      local function n(prefix) return num(session[prefix .. rg] or 0) end
      items[#items + 1] = rg .. '|' .. (session['tf:' .. rg] or '') .. '|' .. int(n('u:'))
        .. '|' .. int(n('c:')) .. '|' .. int(n('fb:')) .. '|' .. int(n('x:'))
      total = total + n('c:')
    end
  end
  table.sort(items)
  write_cdr('kind', 'session', 'started_ms', session.started_ms or '0', 'cause', cause,
    'result', result, 'charged', int(total), 'items', table.concat(items, ';'))
end

local session = hash(request_key)
local exists = session.state ~= nil
if kind == 'S' then
  local deadline = tonumber(redis.call('ZSCORE', deadlines_key, request_key))
  if session.state ~= 'open' or not deadline or deadline > now_ms then
    return '0;!not due'
  end
  request_number = num(session.last_request)
elseif exists then
  local last = num(session.last_request)
  if request_number == last then return session.answer end
  if request_number < last then
    return INVALID_VALUE .. ';!request number lower than the last one processed'
  end
end
-- The session id's claim (KEYS[12], see above): the account holding it, and whether that
-- account's session of this id is open (the claim names its key).
local claim_key = KEYS[12]
local function claimed_elsewhere()
  local held = redis.call('GET', claim_key)
  if not held then return false end
  local holder, holder_key = string.match(held, '^([^|]*)|[^|]*|(.*)$')
  return holder ~= account_id and holder_key ~= nil
    and redis.call('HGET', holder_key, 'state') == 'open'
end

if kind == 'I' then
  if exists then return INVALID_VALUE .. ';!session already exists' end
  if barred then return DENIED .. ';!account is barred' end
  if claim_key and claimed_elsewhere() then
    return INVALID_VALUE .. ';!session_id: already open on another account'
  end
elseif session.state ~= 'open' then
  return UNKNOWN_SESSION .. ';!unknown or closed session'
end
local closing = kind == 'T' or kind == 'S'

local session_changes = {}  -- field -> new value
local function sget(field) return num(session_changes[field] or session[field] or 0) end
local function sset(field, value) session_changes[field] = value end

-- Gives back what this session holds for a rating group, so it can be charged or
-- granted again from the whole balance and the buckets.
local function release(rg)
  local money = sget('m:' .. rg)
  reserved = reserved - money
  account_add('reserved', -money)
  sset('m:' .. rg, 0)
  -- (a session that never held bucket units has neither field: none written per request)
  local held_field = 'bl:' .. rg
  local held = session_changes[held_field] or session[held_field]
  if held and held ~= '' then
    release_buckets(held)
    sset('b:' .. rg, 0)
    sset('bl:' .. rg, '')
  end
end

local function charge_usage(block)
  local rg, used = block.rg, block.used
  local from_buckets = consume_buckets(block.bucket_rg,
    math.min(used, bucket_units_free(block.bucket_rg)))
  local rated = sget('r:' .. rg)
  local money_units = used - from_buckets
  -- the usage ended at the event time: its rated units are the last ones before it
  local schedule = schedule_from(block, rated, period_units(block), -money_units)
  local price = cost(schedule, rated + money_units) - cost(schedule, rated)
  local charged = math.min(price, math.max(0, available_money()))
  charge_money(charged)
  add_period_units(block, money_units)
  sset('r:' .. rg, rated + money_units)
  sset('u:' .. rg, sget('u:' .. rg) + used)
  sset('c:' .. rg, sget('c:' .. rg) + charged)
  sset('fb:' .. rg, sget('fb:' .. rg) + from_buckets)
  sset('x:' .. rg, sget('x:' .. rg) + price - charged)
  record_usage(rg, used, charged, from_buckets, price - charged)
  observe_usage(rg, used)
  notify('usage_charged', 'rg', rg, 'units', used, 'amount', charged,
    'from_buckets', from_buckets, 'uncharged', price - charged, 'balance', balance)
  return charged
end

-- Reserves up to `wanted` units: buckets first, then what the money can buy.
-- Returns the units granted, whether they are the last the account can afford, and the
-- earliest expiry (unix s, 0: none) of the buckets they draw on.
local function grant(block, wanted)
  local rg = block.rg
  local from_buckets, held, earliest = 0, '', 0
  local free = bucket_units_free(block.bucket_rg)
  if free > 0 then
    from_buckets, held, earliest = take_buckets(block.bucket_rg, math.min(wanted, free), true)
  end
  local rated = sget('r:' .. rg)
  -- the grant starts at the event time
  local schedule = schedule_from(block, rated, period_units(block), 0)
  local money_units = affordable_units(schedule, rated, available_money(),
    wanted - from_buckets)
  local money = cost(schedule, rated + money_units) - cost(schedule, rated)
  reserved = reserved + money
  account_add('reserved', money)
  sset('m:' .. rg, money)
  if from_buckets > 0 then
    sset('b:' .. rg, from_buckets)
    sset('bl:' .. rg, held)
  end
  local granted = from_buckets + money_units
  local more = bucket_units_free(block.bucket_rg) > 0
    or affordable_units(schedule, rated + money_units, available_money(), 1) > 0
  return granted, (granted < wanted) or not more, earliest
end

local parts, shared_code = '', nil  -- parts: ";<block>" per block
local final_rgs = {}  -- the rating groups granted their final units
for _, block in ipairs(blocks) do
  local rg = block.rg
  local code, granted, charged, final, expires_in_s = SUCCESS, 0, 0, '0', 0
  if block.status == 'none' then
    code = RATING_FAILED
  elseif block.status == 'free' then
    code = NOT_APPLICABLE
    if block.used > 0 then record_usage(rg, block.used, 0, 0, 0) end
  else
    sset('k:' .. rg, block.bucket_rg)  -- remembers the rating group for Terminate
    sset('tf:' .. rg, block.tariff)
    release(rg)
    if block.used > 0 then charged = charge_usage(block) end
    if not closing and block.requested >= 0 then
      if barred then
        code = DENIED
      else
        local is_final, earliest
        granted, is_final, earliest = grant(block, block.requested)
        if earliest > 0 then expires_in_s = earliest - now_s end
        if granted == 0 then
          code = LIMIT_REACHED
          notify('credit_exhausted', 'rg', rg)
        else
          notify('quota_granted', 'rg', rg, 'units', granted,
            'reserved', sget('m:' .. rg), 'final', is_final and '1' or '0')
          if is_final then
            final = block.final_action
            final_rgs[#final_rgs + 1] = rg
            notify('final_units_granted', 'rg', rg, 'units', granted)
          end
        end
      end
    end
  end
  shared_code = fold_code(shared_code, code)
  parts = parts .. ';' .. rg .. ',' .. code .. ',' .. block.unit .. ',' .. int(granted) .. ','
    .. int(charged) .. ',' .. final .. ',' .. int(expires_in_s)
end
if closing then
  -- release the rating groups the Terminate did not mention
  local mentioned = {}
  for _, block in ipairs(blocks) do mentioned[block.rg] = true end
  for field, _ in pairs(session) do
    local rg = string.match(field, '^k:(.+)$')
    if rg and not mentioned[rg] then release(rg) end
  end
end

-- (no blocks: the code alone, as text like every answer)
local answer = int(overall_code(shared_code)) .. parts
if kind == 'S' then answer = session.answer end  -- the client's last answer stays

if kind == 'I' then
  sset('started_ms', now_ms)
  sset('account', account_id)  -- for the supervision sweep, which starts from the key
  sset('session', session_id)
end

write_buckets()
write_account()
local flat = { 'last_request', int(request_number), 'answer', answer }
if session.state ~= 'open' or closing then
  flat[5], flat[6] = 'state', closing and 'closed' or 'open'
end
for field, value in pairs(session_changes) do
  if type(value) == 'number' then value = int(value) end
  -- a field that keeps its value is not written again: the hash comes out the same,
  -- and each field named in the HSET costs Redis a search of the hash (its listpack)
  if session[field] ~= value then
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
end
redis.call('HSET', request_key, unpack(flat))
if closing then
  local cause = (kind == 'T') and 'terminate' or 'supervision'
  notify('session_ended', 'cause', cause)
  redis.call('SREM', sessions_key, request_key)
  redis.call('HDEL', final_key, session_id)
  redis.call('ZREM', deadlines_key, request_key)
  if claim_key then
    local held = redis.call('GET', claim_key)
    if held and string.sub(held, 1, #account_id + 1) == account_id .. '|' then
      redis.call('DEL', claim_key)
    end
  end
  redis.call('EXPIRE', request_key, retention_s)
  -- the session as just written: what was read, with this request's changes over it
  for field, value in pairs(session_changes) do session[field] = value end
  write_session_cdr(session, cause, answer:match('^%d+'))
else
  if kind == 'I' then
    redis.call('SADD', sessions_key, request_key)
    if claim_key then
      redis.call('SET', claim_key, account_id .. '|' .. int(now_ms) .. '|' .. request_key)
    end
  end
  if #final_rgs > 0 then
    redis.call('HSET', final_key, session_id, table.concat(final_rgs, ','))
  end
  redis.call('ZADD', deadlines_key, int(now_ms + supervision_ms), request_key)
end
write_records()
return answer
