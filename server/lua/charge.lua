--[[
charge.lua: every charging request (session Initial / Update / Terminate and one-shot
events) in one atomic step: one EVALSHA, one round trip. It reads and checks everything
first, then writes; a refusal writes nothing.

KEYS (all of one account, under one hash tag, so the script runs on Redis Cluster):
  KEYS[1] account hash    balance, credit_limit, state, reserved, initial, topped_up,
                          charged, refunded, bres:<rg> (bucket units reserved by sessions)
  KEYS[2] request key     session hash (kinds I/U/T) or event answer string (kind E)
  KEYS[3] buckets hash    bucket id -> "rg|remaining|expires_at_s|priority|initial|kind"
  KEYS[4] usage hash      <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged
  KEYS[5] open sessions   set of the ids of the sessions that are open

ARGV:
  [1] kind: "I", "U", "T" (session) or "E" (event)
  [2] request number
  [3] now, unix seconds (bucket expiry)
  [4] answer retention, seconds: how long a closed session or an event answer is kept
      so that a retransmission gets the same answer
  [5] event action (kind E): "DEBIT", "REFUND", "CHECK", "PRICE"; "-" otherwise
  [6] number of rating-group blocks, then each block as:
      block id (rating group, or "<rating group>.<service id>"), the rating group whose
      unit buckets apply, tariff status ("ok" / "free" / "none"), requested units (-1: none),
      used units, connect fee, number of price segments S, then S triples
      (segment end in cumulative units or -1 for no end, increment units, increment price)

Return: the answer as one string "<code>;<block>;<block>...". A session block is
"rg,code,granted,charged,final"; an event block is "rg,code,units,amount,from_buckets",
and an event answer ends with ";B<balance>,<sufficient 0/1>". A refusal before any write
is "<code>;!<reason>". Retransmissions get the stored string unchanged.

Numbers are Lua doubles: every integer the caller passes is below 2^53 and costs
saturate at MAX_SAFE; integers are written back with %d (tostring would print 1e+15).
]]

local MAX_SAFE = 9007199254740991
local SUCCESS, DENIED, NOT_APPLICABLE, LIMIT_REACHED = 2001, 4010, 4011, 4012
local UNKNOWN_SESSION, INVALID_VALUE, USER_UNKNOWN, RATING_FAILED = 5002, 5004, 5030, 5031

local function int(x) return string.format('%d', x) end

local account_key, request_key, buckets_key, usage_key, sessions_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local kind = ARGV[1]
local request_number = tonumber(ARGV[2])
local now_s = tonumber(ARGV[3])
local retention_s = tonumber(ARGV[4])
local event_action = ARGV[5]

-- ---------------------------------------------------------------- decoding the blocks
local blocks = {}
do
  local i = 7
  for _ = 1, tonumber(ARGV[6]) do
    local block = {
      rg = ARGV[i], bucket_rg = ARGV[i + 1], status = ARGV[i + 2],
      requested = tonumber(ARGV[i + 3]), used = tonumber(ARGV[i + 4]),
      connect_fee = tonumber(ARGV[i + 5]), segments = {},
    }
    local segment_count = tonumber(ARGV[i + 6])
    i = i + 7
    for s = 1, segment_count do
      local ending = tonumber(ARGV[i])
      if ending < 0 then ending = math.huge end
      block.segments[s] = { ending = ending, increment = tonumber(ARGV[i + 1]),
        price = tonumber(ARGV[i + 2]) }
      i = i + 3
    end
    blocks[#blocks + 1] = block
  end
end

-- ---------------------------------------------------------------- rating
-- Keep in step with server/rating.py (PriceSchedule.cost / max_units_within).

-- Price of the first `units` units counted from the start of the session (or event):
-- the connect fee once, then whole increments of each segment, the last one rounded up.
local function cost(block, units)
  if units <= 0 then return 0 end
  local total, start = block.connect_fee, 0
  for _, seg in ipairs(block.segments) do
    local stop = math.min(units, seg.ending)
    total = total + math.ceil((stop - start) / seg.increment) * seg.price
    if total >= MAX_SAFE then return MAX_SAFE end
    if units <= seg.ending then return total end
    start = seg.ending
  end
  return MAX_SAFE  -- units beyond the last segment have no price: unaffordable
end

-- The largest cumulative unit count n, at an increment boundary, with cost(n) <= budget.
local function max_units_within(block, budget)
  if budget < block.connect_fee then return 0 end
  local spent, start = block.connect_fee, 0
  for _, seg in ipairs(block.segments) do
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
local function affordable_units(block, from, amount, wanted)
  if amount < 0 then amount = 0 end
  local reach = max_units_within(block, cost(block, from) + amount)
  return math.max(0, math.min(wanted, reach - from))
end

-- ---------------------------------------------------------------- state
local function hash(key)
  local raw = redis.call('HGETALL', key)
  local t = {}
  for i = 1, #raw, 2 do t[raw[i]] = raw[i + 1] end
  return t
end

local account = hash(account_key)
if account.balance == nil then return USER_UNKNOWN .. ';!unknown account' end
local balance = tonumber(account.balance)
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

-- Unit buckets: parsed once; changes are kept in memory and written at the end.
local buckets_by_rg = {}
do
  local raw = redis.call('HGETALL', buckets_key)
  for i = 1, #raw, 2 do
    local f = {}
    for part in string.gmatch(raw[i + 1], '[^|]+') do f[#f + 1] = part end
    local expires = tonumber(f[3])
    if expires == 0 or expires > now_s then
      local list = buckets_by_rg[f[1]] or {}
      list[#list + 1] = { id = raw[i], rg = f[1], remaining = tonumber(f[2]),
        expires = expires, priority = tonumber(f[4]), initial = f[5], kind = f[6] }
      buckets_by_rg[f[1]] = list
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

local function bucket_units_free(rg)
  local total = 0
  for _, b in ipairs(buckets_by_rg[rg] or {}) do total = total + b.remaining end
  return math.max(0, total - tonumber(account['bres:' .. rg] or 0)
    - (account_changes['bres:' .. rg] or 0))
end

local function consume_buckets(rg, units)
  local taken = 0
  for _, b in ipairs(buckets_by_rg[rg] or {}) do
    if taken >= units then break end
    local take = math.min(b.remaining, units - taken)
    if take > 0 then
      b.remaining = b.remaining - take
      b.dirty = true
      taken = taken + take
    end
  end
  return taken
end

local function write_buckets()
  for _, list in pairs(buckets_by_rg) do
    for _, b in ipairs(list) do
      if b.dirty then
        redis.call('HSET', buckets_key, b.id, table.concat(
          { b.rg, int(b.remaining), int(b.expires), int(b.priority), b.initial, b.kind }, '|'))
      end
    end
  end
end

local function write_account()
  for field, delta in pairs(account_changes) do
    redis.call('HINCRBY', account_key, field, int(delta))
  end
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

local function overall_code(codes)
  if #codes == 0 then return SUCCESS end
  -- the request as a whole fails only when every rating group failed the same way
  for i = 2, #codes do
    if codes[i] ~= codes[1] then return SUCCESS end
  end
  return codes[1]
end

-- ---------------------------------------------------------------- events
local function handle_event()
  local stored = redis.call('GET', request_key)
  if stored then
    local sep = string.find(stored, '|', 1, true)
    local stored_number = tonumber(string.sub(stored, 1, sep - 1))
    if stored_number == request_number then return string.sub(stored, sep + 1) end
    if request_number < stored_number then
      return INVALID_VALUE .. ';!request number lower than the last one processed'
    end
  end
  if barred and event_action == 'DEBIT' then
    return DENIED .. ';!account is barred'
  end
  local parts, codes, sufficient = {}, {}, 1
  for _, block in ipairs(blocks) do
    local code, amount, from_buckets = SUCCESS, 0, 0
    local units = block.requested
    if block.status == 'none' then
      code = RATING_FAILED
    elseif block.status == 'free' then
      code = NOT_APPLICABLE
    elseif event_action == 'PRICE' then
      amount = cost(block, units)
    elseif event_action == 'REFUND' then
      amount = cost(block, units)
      balance = balance + amount
      account_add('balance', amount)
      account_add('refunded', amount)
      record_usage(block.rg, 0, -amount, 0, 0)
    else  -- DEBIT or CHECK: buckets first, then money
      from_buckets = math.min(units, bucket_units_free(block.bucket_rg))
      amount = cost(block, units - from_buckets)
      if amount > available_money() then
        code, sufficient = LIMIT_REACHED, 0
        if event_action == 'DEBIT' then from_buckets = 0 end
      elseif event_action == 'DEBIT' then
        consume_buckets(block.bucket_rg, from_buckets)
        charge_money(amount)
        record_usage(block.rg, units, amount, from_buckets, 0)
      end
    end
    codes[#codes + 1] = code
    parts[#parts + 1] = table.concat(
      { block.rg, code, int(units), int(amount), int(from_buckets) }, ',')
  end
  local answer = overall_code(codes)
  if #parts > 0 then answer = answer .. ';' .. table.concat(parts, ';') end
  answer = answer .. ';B' .. int(balance) .. ',' .. sufficient
  write_buckets()
  write_account()
  if event_action == 'DEBIT' or event_action == 'REFUND' then
    redis.call('SET', request_key, int(request_number) .. '|' .. answer, 'EX', retention_s)
  end
  return answer
end

-- ---------------------------------------------------------------- sessions
local function handle_session()
  local session = hash(request_key)
  local exists = session.state ~= nil
  if exists then
    local last = tonumber(session.last_request)
    if request_number == last then return session.answer end
    if request_number < last then
      return INVALID_VALUE .. ';!request number lower than the last one processed'
    end
  end
  if kind == 'I' then
    if exists then return INVALID_VALUE .. ';!session already exists' end
    if barred then return DENIED .. ';!account is barred' end
  elseif not exists or session.state ~= 'open' then
    return UNKNOWN_SESSION .. ';!unknown or closed session'
  end

  local session_changes = {}  -- field -> new value
  local function sget(field) return tonumber(session_changes[field] or session[field] or 0) end
  local function sset(field, value) session_changes[field] = value end

  -- Gives back what this session holds for a rating group, so it can be charged or
  -- granted again from the whole balance.
  local function release(rg, bucket_rg)
    local money, bucket_units = sget('m:' .. rg), sget('b:' .. rg)
    reserved = reserved - money
    account_add('reserved', -money)
    account_add('bres:' .. bucket_rg, -bucket_units)
    sset('m:' .. rg, 0)
    sset('b:' .. rg, 0)
  end

  local function charge_usage(block)
    local rg, used = block.rg, block.used
    local from_buckets = consume_buckets(block.bucket_rg,
      math.min(used, bucket_units_free(block.bucket_rg)))
    local rated = sget('r:' .. rg)
    local money_units = used - from_buckets
    local price = cost(block, rated + money_units) - cost(block, rated)
    local charged = math.min(price, math.max(0, available_money()))
    charge_money(charged)
    sset('r:' .. rg, rated + money_units)
    sset('u:' .. rg, sget('u:' .. rg) + used)
    sset('c:' .. rg, sget('c:' .. rg) + charged)
    record_usage(rg, used, charged, from_buckets, price - charged)
    return charged
  end

  -- Reserves up to `wanted` units: buckets first, then what the money can buy.
  -- Returns the units granted and whether they are the last the account can afford.
  local function grant(block, wanted)
    local rg = block.rg
    local from_buckets = math.min(wanted, bucket_units_free(block.bucket_rg))
    local rated = sget('r:' .. rg)
    local money_units = affordable_units(block, rated, available_money(), wanted - from_buckets)
    local money = cost(block, rated + money_units) - cost(block, rated)
    reserved = reserved + money
    account_add('reserved', money)
    account_add('bres:' .. block.bucket_rg, from_buckets)
    sset('m:' .. rg, money)
    sset('b:' .. rg, from_buckets)
    local granted = from_buckets + money_units
    local more = bucket_units_free(block.bucket_rg) > 0
      or affordable_units(block, rated + money_units, available_money(), 1) > 0
    return granted, (granted < wanted) or not more
  end

  local parts, codes = {}, {}
  local mentioned = {}
  for _, block in ipairs(blocks) do
    local rg = block.rg
    mentioned[rg] = true
    local code, granted, charged, final = SUCCESS, 0, 0, 0
    if block.status == 'none' then
      code = RATING_FAILED
    elseif block.status == 'free' then
      code = NOT_APPLICABLE
      if block.used > 0 then record_usage(rg, block.used, 0, 0, 0) end
    else
      sset('k:' .. rg, block.bucket_rg)  -- remembers the rating group for Terminate
      release(rg, block.bucket_rg)
      if block.used > 0 then charged = charge_usage(block) end
      if kind ~= 'T' and block.requested >= 0 then
        if barred then
          code = DENIED
        else
          local is_final
          granted, is_final = grant(block, block.requested)
          if granted == 0 then
            code = LIMIT_REACHED
          elseif is_final then
            final = 1
          end
        end
      end
    end
    codes[#codes + 1] = code
    parts[#parts + 1] = table.concat({ rg, code, int(granted), int(charged), final }, ',')
  end
  if kind == 'T' then
    -- release the rating groups the Terminate did not mention
    for field, _ in pairs(session) do
      local rg = string.match(field, '^k:(.+)$')
      if rg and not mentioned[rg] then release(rg, session[field]) end
    end
  end

  local answer = overall_code(codes)
  if #parts > 0 then answer = answer .. ';' .. table.concat(parts, ';') end

  write_buckets()
  write_account()
  local flat = { 'last_request', int(request_number), 'answer', answer,
    'state', (kind == 'T') and 'closed' or 'open' }
  for field, value in pairs(session_changes) do
    flat[#flat + 1] = field
    flat[#flat + 1] = int(value)
  end
  redis.call('HSET', request_key, unpack(flat))
  if kind == 'T' then
    redis.call('SREM', sessions_key, request_key)
    redis.call('EXPIRE', request_key, retention_s)
  elseif kind == 'I' then
    redis.call('SADD', sessions_key, request_key)
  end
  return answer
end

if kind == 'E' then return handle_event() end
return handle_session()
