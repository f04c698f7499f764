-- charge.lua, part 3 of 7 (after rating.lua; see prelude.lua)
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
      unit = ARGV[i + 6], final_action = ARGV[i + 7],
      -- (set here so that read_rate_table adds no field: no rehash of the table)
      period = '-', fixed_schedule = false }
    i = i + 8
    if block.status == 'ok' then i = read_rate_table(block, i) end
    blocks[b] = block
  end
end

