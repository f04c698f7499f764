-- charge.lua, part 4 of 9 (after rating.lua; see prelude.lua)
-- ---------------------------------------------------------------- decoding the arguments
-- (After the rating functions: num() is one of them.) One request's, set by read_arguments.
local account_key, request_key, buckets_key, usage_key, sessions_key, final_key,
  events_key, cdrs_key, rates_key, event_counter_key, deadlines_key, money_key
local kind, request_number, account_id, session_id, now_ms, event_time_ms, retention_s,
  event_action, trim_strategy, trim_threshold, spike_fast_s, spike_slow_s, spike_factor,
  supervision_ms, refund_of, assumed_plan, default_plan, member_period, block_count
local now_s
local blocks
-- Where the blocks start (after the arguments read_arguments reads)
local FIRST_BLOCK_ARGUMENT = 20

-- The rating-group blocks.
local function read_blocks()
  blocks = {}
  local i = FIRST_BLOCK_ARGUMENT
  for b = 1, block_count do
    -- (the fields as creditline/store/contract.py BLOCK_FIELDS orders them)
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

local function read_arguments()
  account_key, request_key, buckets_key, usage_key, sessions_key, final_key,
    events_key, cdrs_key, rates_key, event_counter_key, deadlines_key, money_key =
    base_unpack(KEYS, 1, 12)
  -- (one argument per line, named as creditline/store/contract.py ChargeArgs names it: the
  -- tests hold the two to each other)
  kind = ARGV[1]
  request_number = num(ARGV[2])
  account_id = ARGV[3]
  session_id = ARGV[4]
  now_ms = num(ARGV[5])
  event_time_ms = num(ARGV[6])
  retention_s = num(ARGV[7])
  event_action = ARGV[8]
  trim_strategy = ARGV[9]
  trim_threshold = ARGV[10]
  spike_fast_s = num(ARGV[11])
  spike_slow_s = num(ARGV[12])
  spike_factor = num(ARGV[13])
  supervision_ms = num(ARGV[14])
  refund_of = ARGV[15]
  assumed_plan = ARGV[16]
  default_plan = ARGV[17]
  member_period = ARGV[18]
  block_count = num(ARGV[19])
  now_s = math_floor(now_ms / 1000)
  read_blocks()
end
