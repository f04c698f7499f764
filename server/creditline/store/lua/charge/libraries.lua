-- charge.lua, part 2 of 9 (after prelude.lua; see prelude.lua)
-- ---------------------------------------------------------------- libraries
-- The standard functions the script calls, as locals of the chunk: a local is one step to
-- reach where a global is a lookup in the environment and then one in its library (-26k
-- instructions per request, 5 %). Bound by the first request: loading a library (FUNCTION
-- LOAD) may not touch the libraries, Redis's own included (bind_libraries, from charge).
local math_min, math_max, math_ceil, math_floor, math_huge, math_exp
local string_format, string_match, string_gmatch, string_sub, string_rep
local table_concat, table_sort, struct_pack, struct_unpack, redis_call, redis_setresp
local base_pairs, base_ipairs, base_unpack, base_tonumber  -- (Lua's base library)
local function bind_libraries()
  math_min, math_max, math_ceil, math_floor, math_huge, math_exp =
    math.min, math.max, math.ceil, math.floor, math.huge, math.exp
  string_format, string_match, string_gmatch, string_sub, string_rep =
    string.format, string.match, string.gmatch, string.sub, string.rep
  table_concat, table_sort, struct_pack, struct_unpack = table.concat, table.sort,
    struct.pack, struct.unpack
  redis_call, redis_setresp = redis.call, redis.setresp
  base_pairs, base_ipairs, base_unpack, base_tonumber = pairs, ipairs, unpack, tonumber
end

-- Integers as text for Redis (%d: tostring would print 1e+15). Many are written more than
-- once per request (the time, the balance, zeros): each is formatted once, string.format
-- costs ~1,500 instructions.
local int_texts  -- (one request's: set again by charge)
local function int(x)
  local text = int_texts[x]
  if text == nil then
    text = string_format('%d', x)
    if x == x then int_texts[x] = text end  -- (NaN cannot be a key)
  end
  return text
end
