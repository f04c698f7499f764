-- charge.lua, part 3 of 9 (after libraries.lua; see prelude.lua)
-- ---------------------------------------------------------------- rating
-- Keep in step with server/rating.py (RateTable.schedule, PriceSchedule.cost /
-- max_units_within). A schedule is one flat array over the session's cumulative units:
-- { connect fee, then per segment its end, increment and price per increment } (no table
-- per segment: fewer allocations per request); segment ends fall on the session's
-- increment boundaries, the last one's is math.huge.

local MAX_SEGMENTS = 64

local function band_at(block, offset_s)
  local band = block.changes[1].band
  for _, change in base_ipairs(block.changes) do
    if change.offset_s > offset_s then break end
    band = change.band
  end
  return block.bands[band]
end

-- The prices at cumulative unit `units` of a schedule from `rated` (see schedule_from).
-- (Functions of their own rather than closures in schedule_from: making a closure per call
-- searches the script's open upvalues for each variable it uses.)
local function prices_at(block, rated, offset_s, units)
  local ahead = math_max(0, units - rated)
  if block.time_based then return band_at(block, offset_s + ahead) end
  return band_at(block, offset_s)
end

local function tier_at(block, rated, period_units, units)
  local position, tier = period_units + math_max(0, units - rated), 0
  for _, from_units in base_ipairs(block.tiers) do
    if from_units <= position then tier = tier + 1 end
  end
  return tier
end

-- The schedule for the units from `rated` on: unit `rated` is `offset_s` seconds from the
-- event time (time-based tariffs) and at `period_units` of the billing period. Segments
-- before `rated` are priced as at `rated`: paid already, they cancel out of every difference.
local function schedule_from(block, rated, period_units, offset_s)
  -- One band and no tiers (most tariffs): the same schedule wherever the session stands,
  -- built by the server (RateTableForm FIXED, read_fixed_schedule)
  if block.fixed_schedule then return block.fixed_schedule end
  local first, following = block.first, block.following
  local starts, seen = { first }, { [first] = true }
  local function add(units)
    local start = first
    if units > first then
      start = first + math_ceil((units - first) / following) * following
    end
    if not seen[start] then seen[start] = true; starts[#starts + 1] = start end
  end
  if block.time_based then
    for c = 2, #block.changes do
      local at = rated + block.changes[c].offset_s - offset_s
      if at > rated then add(at) end
    end
  end
  for _, from_units in base_ipairs(block.tiers) do
    if from_units > period_units then add(rated + from_units - period_units) end
  end
  table_sort(starts)
  local schedule = { block.connect_fee, first, first, prices_at(block, rated, offset_s, 0)[1] }
  local count = math_min(#starts, MAX_SEGMENTS - 1)
  for index = 1, count do
    local start = starts[index]
    local ending = math_huge
    if index < count then ending = starts[index + 1] end
    local tier = tier_at(block, rated, period_units, start)
    local price = prices_at(block, rated, offset_s, start)[2 + tier]
    local last = #schedule - 2  -- the segment before
    if schedule[last + 1] == following and schedule[last + 2] == price then
      schedule[last] = ending  -- same price as the segment before: one segment
    else
      schedule[last + 3], schedule[last + 4], schedule[last + 5] = ending, following, price
    end
  end
  return schedule
end

-- Price of the first `units` units counted from the start of the session (or event):
-- the connect fee once, then whole increments of each segment, the last one rounded up.
local function cost(schedule, units)
  if units <= 0 then return 0 end
  local total, start = schedule[1], 0
  for at = 2, #schedule, 3 do
    local ending = schedule[at]
    local stop = math_min(units, ending)
    total = total + math_ceil((stop - start) / schedule[at + 1]) * schedule[at + 2]
    if total >= MAX_SAFE then return MAX_SAFE end
    if units <= ending then return total end
    start = ending
  end
  return MAX_SAFE  -- units beyond the last segment have no price: unaffordable
end

-- The largest cumulative unit count n, at an increment boundary, with cost(n) <= budget.
local function max_units_within(schedule, budget)
  if budget < schedule[1] then return 0 end
  local spent, start = schedule[1], 0
  for at = 2, #schedule, 3 do
    local ending, increment, price = schedule[at], schedule[at + 1], schedule[at + 2]
    local increments = math_ceil((ending - start) / increment)
    local buyable = increments
    if price > 0 then buyable = math_floor((budget - spent) / price) end
    if buyable < increments then return start + buyable * increment end
    if ending == math_huge then return math_huge end
    spent = spent + increments * price
    start = ending
  end
  return start
end

-- Units beyond `from` (at most `wanted`) that `amount` more money pays for.
local function affordable_units(schedule, from, amount, wanted)
  if amount < 0 then amount = 0 end
  local reach = max_units_within(schedule, cost(schedule, from) + amount)
  return math_max(0, math_min(wanted, reach - from))
end

-- A number from a string that the caller (ARGV) or this script (%d, %.17g) wrote. Not
-- tonumber(): Lua 5.1's parses a string twice (lua_isnumber, then lua_tonumber), where
-- arithmetic parses it once (~450 instructions less; ~60 strings a request). Unlike
-- tonumber() it fails on anything that is not a number instead of returning nil.
local function num(text) return text + 0 end

-- A FIXED table's schedule as the server built it (creditline/store/contract.py
-- RateTableForm, FIXED_SCHEDULE_NUMBER): one argument, its numbers binary, already in the
-- schedule's order (the last end infinity).
local FIXED_SCHEDULE_NUMBER = 'd'
-- The struct format of each segment count, made at its first use and kept: at most
-- MAX_SEGMENTS strings, the same for every request (a library's load may not use the
-- string library; a script made by EVALSHA makes them again per call).
local fixed_schedule_formats = {}
local function fixed_schedule_format(count)
  local format = fixed_schedule_formats[count]
  if not format then
    format = '<' .. string_rep(FIXED_SCHEDULE_NUMBER, 1 + 3 * count)
    fixed_schedule_formats[count] = format
  end
  return format
end

-- The schedule from ARGV[i] (after the form); returns the index of the argument after it.
local function read_fixed_schedule(block, i)
  local packed = ARGV[i]
  local schedule = { struct_unpack(fixed_schedule_format((#packed / 8 - 1) / 3), packed) }
  schedule[#schedule] = nil  -- (unpack's last value: the position after the numbers)
  block.fixed_schedule = schedule
  return i + 1
end

-- The rate table of a block (server/rating.py RateTable.script_args), from ARGV[i] on;
-- returns the index of the argument after it. (Indexing ARGV directly: a closure call per
-- argument cost the script ~10 % of its instructions.)
local function read_rate_table(block, i)
  if ARGV[i] == 'F' then return read_fixed_schedule(block, i + 1) end
  i = i + 1  -- 'B': bands or tiers
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

