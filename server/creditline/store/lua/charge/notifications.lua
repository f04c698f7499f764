-- charge.lua, part 6 of 9 (after state.lua; see prelude.lua)
-- ---------------------------------------------------------------- notifications
-- The request's events, written together as one stream entry by write_records, and its
-- rating groups' new usage rates (one request's: set by begin_records).
local notifications, rate_changes
local function begin_records() notifications, rate_changes = {}, {} end
-- notify(text): one event as its text, "<type>|<field>|<value>|...", which the caller
-- writes with one concatenation (a table of the pairs and its concat cost ~2,000
-- instructions more per event).
local function notify(text)
  notifications[#notifications + 1] = text
end

-- Low-balance thresholds crossed downwards by this request: once per crossing.
local function notify_low_balance()
  if not low_balance or balance >= balance_at_start then return end
  for threshold in string_gmatch(low_balance, '[^,]+') do
    local t = base_tonumber(threshold)
    if balance_at_start >= t and balance < t then
      notify('low_balance|threshold|' .. int(t) .. '|balance|' .. int(balance))
    end
  end
end

-- Usage spike: two exponentially decaying usage rates per rating group, over a short and
-- a long window, on the network's event time. A spike is the short-window rate above
-- `factor` times the long-window one, once the account has a long window of history;
-- announced once, and again only after the rate has come back down.
-- A rating group's rates as stored (KEYS[9]), binary: creditline/store/contract.py
-- USAGE_RATES_FORMAT (fast, slow, at_ms, since_ms, spike 0/1), USAGE_RATES_BYTES long.
local USAGE_RATES_FORMAT, USAGE_RATES_BYTES = '<ddddB', 33

-- The rates of a rating group as stored, or new ones (none yet; or an older version's
-- text, whose history then starts again).
local function stored_rates(rg)
  local stored = redis_call('HGET', rates_key, rg)
  if stored and #stored == USAGE_RATES_BYTES then
    local fast, slow, at_ms, since_ms, spike = struct_unpack(USAGE_RATES_FORMAT, stored)
    return { fast = fast, slow = slow, at_ms = at_ms, since_ms = since_ms, spike = spike == 1 }
  end
  return { fast = 0, slow = 0, at_ms = event_time_ms, since_ms = event_time_ms,
    spike = false }
end

local function observe_usage(rg, units)
  if units <= 0 or spike_factor <= 0 then return end
  local rates = rate_changes[rg]
  if not rates then
    rates = stored_rates(rg)
    rate_changes[rg] = rates
  end
  local elapsed_s = math_max(0, event_time_ms - rates.at_ms) / 1000
  rates.fast = rates.fast * math_exp(-elapsed_s / spike_fast_s) + units / spike_fast_s
  rates.slow = rates.slow * math_exp(-elapsed_s / spike_slow_s) + units / spike_slow_s
  rates.at_ms = math_max(rates.at_ms, event_time_ms)
  local history_s = (rates.at_ms - rates.since_ms) / 1000
  local high = history_s >= spike_slow_s and rates.fast > spike_factor * rates.slow
  if high and not rates.spike then
    notify('usage_spike|rg|' .. rg .. '|units|' .. int(units) .. '|rate_per_s|'
      .. string_format('%.3f', rates.fast) .. '|usual_rate_per_s|'
      .. string_format('%.3f', rates.slow))
  end
  if high then rates.spike = true
  elseif rates.fast < spike_factor * rates.slow / 2 then rates.spike = false end
end

local function write_rates()
  local flat = {}
  for rg, r in base_pairs(rate_changes) do
    flat[#flat + 1] = rg
    flat[#flat + 1] = struct_pack(USAGE_RATES_FORMAT, r.fast, r.slow, r.at_ms, r.since_ms,
      r.spike and 1 or 0)
  end
  if #flat > 0 then redis_call('HSET', rates_key, base_unpack(flat)) end
end

-- All writes of the request that are not the charge itself: notifications, rates,
-- expired buckets. Called once, after every check has passed.
local function write_records()
  for _, b in base_ipairs(expired_buckets) do
    redis_call('HDEL', buckets_key, b.id)
    if num(b.remaining) > 0 then
      notify('bucket_expired|rg|' .. b.rg .. '|bucket|' .. b.id .. '|units|' .. b.remaining)
    end
  end
  write_rates()
  notify_low_balance()
  if #notifications == 0 then return end
  -- One entry for all the request's events: n numbers its last event (they are n - k + 1
  -- .. n in the partition's count), e holds them in order. Why: an entry per event cost
  -- ~3.3 XADD and INCR per request here and as many entries for every reader to decode.
  local last = redis_call('INCRBY', event_counter_key, #notifications)
  local refunds = {}  -- the id a refund names: the client's string, a field of the entry
  if refund_of ~= '' then refunds = { 'refunds', refund_of } end
  redis_call('XADD', events_key, trim_strategy, '~', trim_threshold, '*', 'a', account_id,
    's', session_id, 'ts', int(now_ms), 'n', last, 'e', table_concat(notifications, ';'),
    base_unpack(refunds))
end

-- write_cdr(field, value, ...), like notify
local function write_cdr(...)
  redis_call('XADD', cdrs_key, '*', base_unpack({ 'account', account_id, 'session', session_id,
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

