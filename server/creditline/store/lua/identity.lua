--[[
identity.lua: binds a subscriber identity to an account, in one step, so that two Admin
calls binding one identity to two accounts cannot both believe they bound it (a GET then a
SET from the server could interleave; SET ... NX GET is not taken together before Redis 7).

KEYS[1] the identity (a string in its own partition: server/store.py identity_key)
ARGV[1] the account id (never empty; the server checked that the account exists)
ARGV[2] "1": rebind an identity bound to another account; else such a binding stands

-> { "SET", <the account it was bound to before, "" for none> } (bound to ARGV[1] now), or
   { "TAKEN", <the other account> } (nothing changed)
]]

local bound = redis.call('GET', KEYS[1])
if bound ~= false and bound ~= ARGV[1] and ARGV[2] ~= '1' then
  return { 'TAKEN', bound }
end
redis.call('SET', KEYS[1], ARGV[1])
return { 'SET', bound or '' }
