-- charge.lua, part 8 of 8 (after session.lua; see prelude.lua)
-- ---------------------------------------------------------------- the entry point
-- One charging request: its keys and arguments (KEYS, ARGV in a script), its answer.
local function charge(keys, args)
  KEYS, ARGV, int_texts = keys, args, { [0] = '0' }
  read_arguments()
  local refusal = read_account()
  if refusal then return refusal end
  read_buckets()
  begin_records()
  if kind == 'E' then return event_request() end
  return session_request()
end
