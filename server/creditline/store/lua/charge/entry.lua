-- charge.lua, part 9 of 9 (after session.lua; see prelude.lua)
-- ---------------------------------------------------------------- the entry point
-- One charging request: its keys and arguments (KEYS, ARGV in a script), its answer.
local function charge(keys, args)
  if not math_min then bind_libraries() end
  KEYS, ARGV, int_texts = keys, args, { [0] = '0' }
  read_arguments()
  local refusal = read_account()
  if refusal then return refusal end
  read_buckets()
  begin_records()
  if kind == 'E' then return event_request() end
  return session_request()
end
