-- charge.lua, part 8 of 9 (after event.lua; see prelude.lua)
-- ---------------------------------------------------------------- sessions
-- (kinds I, U, T and S: session_request)

-- One request's (set by session_request): the session hash as read, the state of each
-- rating group this request touches (block id -> rating group state, see state.lua), the
-- rating groups granted their final units, whether the request closes the session, and the
-- session id's claim (KEYS[13], see above).
local session, rg_states, final_rgs, closing, claim_key

-- An Initial's refusal: the id is open on another account (its claim names that
-- account's session key), or the account is barred.
local function refuse_initial(exists)
  if exists then return INVALID_VALUE .. ';!session already exists' end
  if barred then return DENIED .. ';!account is barred' end
  local held = claim_key and redis_call('GET', claim_key)
  local holder, holder_key
  if held then holder, holder_key = string_match(held, '^([^|]*)|[^|]*|(.*)$') end
  if holder and holder ~= account_id and redis_call('HGET', holder_key, 'state') == 'open' then
    return INVALID_VALUE .. ';!session_id: already open on another account'
  end
  return nil
end

-- The answer when the request is not to be applied (a retransmission's stored answer, or
-- a refusal), else nil. A supervision close ("S") takes the session's last request number.
local function admit_session()
  local exists = session.state ~= nil
  if kind == 'S' then
    local deadline = base_tonumber(redis_call('ZSCORE', deadlines_key, request_key))
    if session.state ~= 'open' or not deadline or deadline > now_ms then
      return '0;!not due'
    end
    request_number = num(session.last_request)
  elseif exists then
    local last = num(session.last_request)
    if request_number == last then return session.answer end
    if request_number < last then
      return INVALID_VALUE .. ';!request number lower than the last one processed'
    end
  end
  if kind == 'I' then return refuse_initial(exists) end
  if session.state ~= 'open' then return UNKNOWN_SESSION .. ';!unknown or closed session' end
  return nil
end

-- A rating group's state in this session: as read (packed, or an older version's fields),
-- or new; kept in rg_states, every one of them written back by write_session.
local function rg_state(rg)
  local state = rg_states[rg]
  if state then return state end
  local packed = session[RG_STATE_PREFIX .. rg]
  if packed then
    state = decode_rg_state(packed)
  elseif session['k:' .. rg] then
    state = legacy_rg_state(session, rg)
  else
    state = new_rg_state()
  end
  rg_states[rg] = state
  return state
end

-- Gives back what this session holds for a rating group, so it can be charged or
-- granted again from the whole balance and the buckets.
local function release(state)
  reserved = reserved - state.m
  account_add('reserved', -state.m)
  state.m = 0
  if state.bl ~= '' then
    release_buckets(state.bl)
    state.b, state.bl = 0, ''
  end
end

local function charge_usage(block, state)
  local rg, used = block.rg, block.used
  local from_buckets = consume_buckets(block.bucket_rg,
    math_min(used, bucket_units_free(block.bucket_rg)))
  -- the units rated so far: those used that buckets did not pay for
  local rated = state.u - state.fb
  local money_units = used - from_buckets
  -- the usage ended at the event time: its rated units are the last ones before it
  local schedule = schedule_from(block, rated, period_units(block), -money_units)
  local price = cost(schedule, rated + money_units) - cost(schedule, rated)
  local charged = math_min(price, math_max(0, available_money()))
  charge_money(charged)
  add_period_units(block, money_units)
  state.u, state.c = state.u + used, state.c + charged
  state.fb, state.x = state.fb + from_buckets, state.x + price - charged
  record_usage(rg, used, charged, from_buckets, price - charged)
  observe_usage(rg, used)
  notify('usage_charged|rg|' .. rg .. '|units|' .. int(used) .. '|amount|' .. int(charged)
    .. '|from_buckets|' .. int(from_buckets) .. '|uncharged|' .. int(price - charged)
    .. '|balance|' .. int(balance))
  return charged
end

-- Reserves up to `wanted` units: buckets first, then what the money can buy.
-- Returns the units granted, whether they are the last the account can afford, and the
-- earliest expiry (unix s, 0: none) of the buckets they draw on.
local function grant(block, state, wanted)
  local from_buckets, held, earliest = 0, '', 0
  local free = bucket_units_free(block.bucket_rg)
  if free > 0 then
    from_buckets, held, earliest = take_buckets(block.bucket_rg, math_min(wanted, free), true)
  end
  local rated = state.u - state.fb
  -- the grant starts at the event time
  local schedule = schedule_from(block, rated, period_units(block), 0)
  local money_units = affordable_units(schedule, rated, grant_money(),
    wanted - from_buckets)
  local money = cost(schedule, rated + money_units) - cost(schedule, rated)
  reserved = reserved + money
  account_add('reserved', money)
  state.m = money
  if from_buckets > 0 then state.b, state.bl = from_buckets, held end
  local granted = from_buckets + money_units
  local more = bucket_units_free(block.bucket_rg) > 0
    or affordable_units(schedule, rated + money_units, grant_money(), 1) > 0
  return granted, (granted < wanted) or not more, earliest
end


-- A rated block's grant: its result code, units, final unit action and the seconds to the
-- earliest expiry of the buckets it draws on.
local function grant_block(block, state)
  if barred then return DENIED, 0, '0', 0 end
  local rg = block.rg
  local granted, is_final, earliest = grant(block, state, block.requested)
  local expires_in_s = earliest > 0 and earliest - now_s or 0
  if granted == 0 then
    notify('credit_exhausted|rg|' .. rg)
    return LIMIT_REACHED, 0, '0', expires_in_s
  end
  notify('quota_granted|rg|' .. rg .. '|units|' .. int(granted) .. '|reserved|'
    .. int(state.m) .. '|final|' .. (is_final and '1' or '0'))
  if not is_final then return SUCCESS, granted, '0', expires_in_s end
  final_rgs[#final_rgs + 1] = rg
  notify('final_units_granted|rg|' .. rg .. '|units|' .. int(granted))
  return SUCCESS, granted, block.final_action, expires_in_s
end

-- One block applied: its result code and its part of the answer (";<block>").
local function answer_block(block)
  local rg = block.rg
  local code, granted, charged, final, expires_in_s = SUCCESS, 0, 0, '0', 0
  if block.status == 'none' then
    code = RATING_FAILED
  elseif block.status == 'free' then
    code = NOT_APPLICABLE
    if block.used > 0 then record_usage(rg, block.used, 0, 0, 0) end
  else
    local state = rg_state(rg)
    state.k, state.tf = block.bucket_rg, block.tariff  -- (the close's release and CDR)
    release(state)
    if block.used > 0 then charged = charge_usage(block, state) end
    if not closing and block.requested >= 0 then
      code, granted, final, expires_in_s = grant_block(block, state)
    end
  end
  return code, ';' .. rg .. ',' .. code .. ',' .. block.unit .. ',' .. int(granted) .. ','
    .. int(charged) .. ',' .. final .. ',' .. int(expires_in_s)
end

-- Every block applied; a close releases the rating groups the request did not mention.
-- (no blocks: the code alone, as text like every answer)
local function answer_blocks()
  local parts, shared_code = '', nil
  for _, block in base_ipairs(blocks) do
    local code, part = answer_block(block)
    shared_code = fold_code(shared_code, code)
    parts = parts .. part
  end
  if closing then  -- (those the blocks applied are released already)
    for field, _ in base_pairs(session) do
      local rg = string_match(field, RG_STATE_FIELD) or string_match(field, '^k:(.+)$')
      if rg and not rg_states[rg] then release(rg_state(rg)) end
    end
  end
  return int(overall_code(shared_code)) .. parts
end


-- The session hash: the request number, the answer, the state, the rating groups' states
-- (an older version's fields of one deleted), and an Initial's own fields.
local function write_session(answer)
  local flat = { 'last_request', int(request_number), 'answer', answer }
  if session.state ~= 'open' or closing then
    flat[#flat + 1], flat[#flat + 2] = 'state', closing and 'closed' or 'open'
  end
  if kind == 'I' then  -- (account and session: for the supervision sweep, from the key)
    flat[#flat + 1], flat[#flat + 2] = 'started_ms', int(now_ms)
    flat[#flat + 1], flat[#flat + 2] = 'account', account_id
    flat[#flat + 1], flat[#flat + 2] = 'session', session_id
  end
  for rg, state in base_pairs(rg_states) do
    flat[#flat + 1], flat[#flat + 2] = RG_STATE_PREFIX .. rg, encode_rg_state(state)
    if state.legacy then delete_legacy_rg_fields(request_key, rg) end
  end
  redis_call('HSET', request_key, base_unpack(flat))
end

-- The CDR of a closed session: one item per rating group it charged or reserved (every
-- one has its state in rg_states at a close).
local function write_session_cdr(cause, result)
  local items, total = {}, 0
  for rg, state in base_pairs(rg_states) do
    items[#items + 1] = rg .. '|' .. state.tf .. '|' .. int(state.u) .. '|' .. int(state.c)
      .. '|' .. int(state.fb) .. '|' .. int(state.x)
    total = total + state.c
  end
  table_sort(items)
  write_cdr('kind', 'session', 'started_ms', session.started_ms or '0', 'cause', cause,
    'result', result, 'charged', int(total), 'items', table_concat(items, ';'))
end

-- A close (T, S): the session leaves the account's sets, gives its claim back, is kept
-- answer_retention_s for retransmissions, and gets its CDR.
local function close_session(answer)
  local cause = (kind == 'T') and 'terminate' or 'supervision'
  notify('session_ended|cause|' .. cause)
  redis_call('SREM', sessions_key, request_key)
  redis_call('HDEL', final_key, session_id)
  redis_call('ZREM', deadlines_key, request_key)
  if claim_key then
    local held = redis_call('GET', claim_key)
    if held and string_sub(held, 1, #account_id + 1) == account_id .. '|' then
      redis_call('DEL', claim_key)
    end
  end
  redis_call('EXPIRE', request_key, retention_s)
  write_session_cdr(cause, answer:match('^%d+'))
end

-- An open session (I, U): in the account's set and claimed (Initial), its final rating
-- groups noted, its supervision deadline moved on.
local function keep_session_open()
  if kind == 'I' then
    redis_call('SADD', sessions_key, request_key)
    if claim_key then
      redis_call('SET', claim_key, account_id .. '|' .. int(now_ms) .. '|' .. request_key)
    end
  end
  if #final_rgs > 0 then
    redis_call('HSET', final_key, session_id, table_concat(final_rgs, ','))
  end
  redis_call('ZADD', deadlines_key, int(now_ms + supervision_ms), request_key)
end

-- A session request (I, U, T, S).
local function session_request()
  session, rg_states, final_rgs = hash(request_key), {}, {}
  claim_key = KEYS[13]
  local early = admit_session() or plan_retry()
  if early then return early end
  closing = kind == 'T' or kind == 'S'
  local answer = answer_blocks()
  if kind == 'S' then answer = session.answer end  -- the client's last answer stays
  write_buckets()
  write_account()
  write_session(answer)
  if closing then close_session(answer) else keep_session_open() end
  write_records()
  return answer
end
