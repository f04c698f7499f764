--[[
claim.lua: which account holds a session id open. A session id is open on one account at
a time; the accounts that could open it may be in other hash slots than each other, so
charge.lua cannot check it, and an Initial claims its session id here first (server/store.py
Store._take_claim decides when another account's claim may be taken over).

KEYS[1] the claim (a string in the session id's own partition): "<account id>|<taken at,
        unix ms>|<the account's session key>" (account ids hold no '|'; charge.lua reads
        and writes the same on one Redis server, where it claims in the request's script)
ARGV[1] TAKE or RELEASE, ARGV[2] the account id, then for TAKE:
ARGV[3] now, unix ms
ARGV[4] another account's claim as the caller read it, to take over ("": none)
ARGV[5] the account's session key

TAKE    -> { "TAKEN" } (it was free, or still the claim of ARGV[4]), { "OURS" } (the
           account holds it already), or { "HELD", claim } (another account holds it)
RELEASE -> 1 if the account held it (deleted now), else 0 (another account took it over)
]]

local claim = redis.call('GET', KEYS[1])
local ours = claim ~= false and string.sub(claim, 1, #ARGV[2] + 1) == ARGV[2] .. '|'
if ARGV[1] == 'RELEASE' then
  if ours then return redis.call('DEL', KEYS[1]) end
  return 0
end
if ours then return { 'OURS' } end
if claim ~= false and claim ~= ARGV[4] then return { 'HELD', claim } end
redis.call('SET', KEYS[1], ARGV[2] .. '|' .. ARGV[3] .. '|' .. ARGV[5])
return { 'TAKEN' }
