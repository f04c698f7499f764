--[[
admin.lua, shared balances: a group (a family, a company) is an account of its own that
holds the money and the allowances; a member ("<group id>/<member>", the server's key
scheme puts it under the group's hash tag) has its own plan, sessions, usage and state,
and an optional limit on what it spends per billing period, and draws on the group's money
(charge.lua KEYS[12]) and buckets. Its own hash keeps what it holds (reserved), charged,
refunded, and spent in the period (spent, spent_period), for the limit (limit).
]]

-- A member made: its group must exist. No money of its own (the server refuses any).
local function create_member(plan, limit)
  if redis.call('EXISTS', money_key) == 0 then return 'NO_GROUP' end
  redis.call('HSET', account_key, 'state', 'active', 'reserved', '0', 'charged', '0',
    'refunded', '0', 'spent', '0', 'spent_period', '', 'plan', plan,
    'group', string.match(account_id, '^[^/]+'), 'created_ms', now_ms)
  if limit ~= '' then redis.call('HSET', account_key, 'limit', limit) end
  redis.call('SADD', members_key, account_id)
  redis.call('SADD', account_index_key, account_id)
  return account('OK')
end

-- A member's limit set ("": none): its open sessions asked again (their grants may shrink).
local function set_limit(limit)
  if not is_member then return 'NOT_MEMBER' end
  if limit == '' then
    redis.call('HDEL', account_key, 'limit')
  else
    redis.call('HSET', account_key, 'limit', limit)
  end
  ask_open_sessions_again()
  return account('OK')
end

-- What a member may not do itself: its group pays and holds the allowances.
local GROUP_OPERATIONS = { TOPUP = true, ADJUST = true, BUCKET = true, PURCHASE = true,
  SUBSCRIBE = true }
local function member_refusal()
  if is_member and GROUP_OPERATIONS[op] then
    return 'MEMBER|' .. string.match(account_id, '^[^/]+')
  end
  return nil
end
