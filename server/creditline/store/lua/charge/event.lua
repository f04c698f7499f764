-- charge.lua, part 7 of 9 (after notifications.lua; see prelude.lua)
-- ---------------------------------------------------------------- events
-- (kind E: event_request)
-- An event block as the answer carries it (see Return above).
local function event_part(block, code, units, amount, from_buckets)
  return ';' .. block.rg .. ',' .. code .. ',' .. block.unit .. ',' .. int(units) .. ','
    .. int(amount) .. ',' .. int(from_buckets)
end

-- A stored event answer "<number>|<answer>[|<refunds>]" -> number, answer, and the
-- refunds of a debit ("" before any; nil for other events: nothing to refund).
local function stored_event(stored)
  local number, answer, rest = string_match(stored, '^([^|]*)|([^|]*)(.*)$')
  if rest == '' then return number, answer, nil end
  return number, answer, string_sub(rest, 2)
end

-- A session's fields with its rating groups' units used, from buckets and money charged
-- as u:, fb:, c: (what refunds read; its ru:, rc: are fields of their own).
local function session_charges(fields)
  local states = {}
  for field, packed in base_pairs(fields) do
    local rg = string_match(field, RG_STATE_FIELD)
    if rg then states[rg] = decode_rg_state(packed) end
  end
  for rg, state in base_pairs(states) do  -- (a table is not added to while it is traversed)
    fields['u:' .. rg], fields['fb:' .. rg], fields['c:' .. rg] = state.u, state.fb, state.c
  end
  return fields
end

-- REFUND: the charge it names, as a session's fields (u:, fb:, c:, ru:, rc: per rating group),
-- and the event's stored answer when it is an event's (nil: a session's); nil when no such
-- charge is kept.
local function refund_target()
  local stored = redis_call('GET', KEYS[13])
  if not stored then
    local session_fields = hash(KEYS[14])
    if next(session_fields) == nil then return nil end
    return session_charges(session_fields), nil
  end
  local _, answer, refunds = stored_event(stored)
  local fields = {}
  if not refunds then return fields, stored end  -- not a debit
  -- a debit's blocks "block id,code,unit kind,units,amount,from buckets", after the code
  for rg, units, amount, from_buckets in
      string_gmatch(answer, ';([^;,]+),%d+,[^,;]+,(%d+),(%d+),(%d+)') do
    fields['u:' .. rg], fields['fb:' .. rg] = num(units), num(from_buckets)
    fields['c:' .. rg] = num(amount)
  end
  for rg, units, amount in string_gmatch(refunds, '([^,=]+)=(%d+):(%d+)') do
    fields['ru:' .. rg], fields['rc:' .. rg] = num(units), num(amount)
  end
  return fields, stored
end

-- REFUND: what it gave back, kept with the charge it names: a session's fields, or the
-- event's stored answer rewritten (its expiry kept) with the refunds after it.
local function record_refunds(target, stored_event_answer, refunded)
  if not stored_event_answer then
    for rg, r in base_pairs(refunded) do
      redis_call('HINCRBY', KEYS[14], 'ru:' .. rg, int(r.units))
      redis_call('HINCRBY', KEYS[14], 'rc:' .. rg, int(r.amount))
    end
    return
  end
  for rg, r in base_pairs(refunded) do
    target['ru:' .. rg] = num(target['ru:' .. rg] or 0) + r.units
    target['rc:' .. rg] = num(target['rc:' .. rg] or 0) + r.amount
  end
  local parts = {}
  for field, units in base_pairs(target) do
    local rg = string_match(field, '^ru:(.+)$')
    if rg then parts[#parts + 1] = rg .. '=' .. int(units) .. ':' .. int(target['rc:' .. rg]) end
  end
  local number, answer = stored_event(stored_event_answer)
  redis_call('SET', KEYS[13], number .. '|' .. answer .. '|' .. table_concat(parts, ','),
    'KEEPTTL')
end

-- REFUND: the money each block gets back, or nil and why the refund is refused. Only
-- money is refunded (units paid from buckets are not given back), at most what the named
-- charge took for the rating group minus what was refunded of it already: a refund of all
-- the units still charged returns exactly the money still charged, a part of them the
-- price of the charge's last units at the refund's prices.
local function refund_amounts(target)
  local amounts = {}
  for index, block in base_ipairs(blocks) do
    local where, rg = 'rating_groups[' .. (index - 1) .. ']', block.rg
    if block.status == 'ok' then
      -- (the units it rated: those used that buckets did not pay for)
      local units_left = num(target['u:' .. rg] or 0) - num(target['fb:' .. rg] or 0)
        - num(target['ru:' .. rg] or 0)
      local money_left = num(target['c:' .. rg] or 0) - num(target['rc:' .. rg] or 0)
      if units_left <= 0 or money_left <= 0 then
        return nil, where .. ': the charge named by refund_of_session_id has no money ' ..
          'left to refund for this rating group'
      end
      local units = block.requested
      if units <= 0 or units > units_left then
        return nil, where .. '.requested: ' .. int(units) .. ' units; 1..' ..
          int(units_left) .. ' of the named charge are left to refund'
      end
      local amount = money_left
      if units < units_left then
        local schedule = schedule_from(block, 0, period_units(block), 0)
        amount = math_min(money_left,
          cost(schedule, units_left) - cost(schedule, units_left - units))
      end
      amounts[index] = amount
    end
  end
  return amounts
end

-- The event's answer when it is not to be applied (a retransmission's stored answer, or a
-- refusal), else nil and, for a REFUND, the charge it names and the money per block.
local function admit_event()
  local stored = redis_call('GET', request_key)
  if stored then
    local stored_number, stored_answer = stored_event(stored)
    stored_number = num(stored_number)
    if stored_number == request_number then return stored_answer end
    if request_number < stored_number then
      return INVALID_VALUE .. ';!request number lower than the last one processed'
    end
  end
  if barred and event_action == 'DEBIT' then
    return DENIED .. ';!account is barred'
  end
  if event_action ~= 'REFUND' then return nil end
  local target, target_event_answer = refund_target()
  if not target then
    return INVALID_VALUE .. ';!refund_of_session_id: no charge of that id is kept ' ..
      '(none made, or it ended more than answer_retention_s ago); a credit that ' ..
      'reverses no charge is an Admin adjustment'
  end
  local refunds, reason = refund_amounts(target)
  if not refunds then return INVALID_VALUE .. ';!' .. reason end
  return nil, target, target_event_answer, refunds
end

-- A CDR item of an event's block: "rg|tariff|units|amount|from buckets|uncharged".
local function event_cdr_item(event, block, units, amount, from_buckets)
  event.cdr_items[#event.cdr_items + 1] = block.rg .. '|' .. block.tariff .. '|'
    .. int(units) .. '|' .. int(amount) .. '|' .. int(from_buckets) .. '|0'
  event.cdr_total = event.cdr_total + amount
end

-- A REFUND's block: the money back to the balance.
local function refund_block(event, block, amount)
  local units = block.requested
  balance = balance + amount
  account_add('balance', amount)
  account_add('refunded', amount)
  record_usage(block.rg, 0, -amount, 0, 0)
  event.refunded[block.rg] = { units = units, amount = amount }
  notify('event_refunded|rg|' .. block.rg .. '|units|' .. int(units) .. '|amount|'
    .. int(amount) .. '|balance|' .. int(balance))
  event_cdr_item(event, block, units, -amount, 0)
end

-- A DEBIT's or CHECK's block, buckets first, then money: its code, amount, units from
-- buckets (a DEBIT that cannot pay charges nothing: the answer says 0).
local function debit_block(event, block)
  local units = block.requested
  local from_buckets = math_min(units, bucket_units_free(block.bucket_rg))
  local amount = cost(schedule_from(block, 0, period_units(block), 0), units - from_buckets)
  local debit = event_action == 'DEBIT'
  if amount > grant_money() then
    event.sufficient = 0
    if not debit then return LIMIT_REACHED, amount, from_buckets end
    notify('credit_exhausted|rg|' .. block.rg)
    return LIMIT_REACHED, 0, 0
  end
  if not debit then return SUCCESS, amount, from_buckets end
  consume_buckets(block.bucket_rg, from_buckets)
  charge_money(amount)
  record_usage(block.rg, units, amount, from_buckets, 0)
  add_period_units(block, units - from_buckets)
  observe_usage(block.rg, units)
  notify('event_charged|rg|' .. block.rg .. '|units|' .. int(units) .. '|amount|'
    .. int(amount) .. '|from_buckets|' .. int(from_buckets) .. '|balance|' .. int(balance))
  event_cdr_item(event, block, units, amount, from_buckets)
  return SUCCESS, amount, from_buckets
end

-- One block of the event: its code and its part of the answer.
local function event_block(event, index, block)
  local code, amount, from_buckets = SUCCESS, 0, 0
  if block.status == 'none' then
    code = RATING_FAILED
  elseif block.status == 'free' then
    code = NOT_APPLICABLE
  elseif event_action == 'PRICE' then
    amount = cost(schedule_from(block, 0, period_units(block), 0), block.requested)
  elseif event_action == 'REFUND' then
    amount = event.refunds[index]
    refund_block(event, block, amount)
  else
    code, amount, from_buckets = debit_block(event, block)
  end
  return code, event_part(block, code, block.requested, amount, from_buckets)
end

-- A DEBIT's or REFUND's writes: the books, the records, the CDR, the stored answer.
local function write_event(event, answer)
  write_buckets()
  write_account()
  write_records()
  if #event.cdr_items > 0 then
    write_cdr('kind', (event_action == 'DEBIT') and 'event' or 'refund',
      'started_ms', int(event_time_ms), 'cause', 'event', 'result', answer:match('^%d+'),
      'charged', int(event.cdr_total), 'items', table_concat(event.cdr_items, ';'), base_unpack(
      event_action == 'REFUND' and { 'refunds', refund_of } or {}))
  end
  if event.target then record_refunds(event.target, event.target_answer, event.refunded) end
  -- a debit's answer ends with '|': its refunds go there (see stored_event)
  local refundable = (event_action == 'DEBIT') and '|' or ''
  redis_call('SET', request_key, int(request_number) .. '|' .. answer .. refundable, 'EX',
    retention_s)
end

-- An event (kind E): DEBIT, REFUND, CHECK or PRICE; only the first two write.
local function event_request()
  local early, target, target_answer, refunds = admit_event()
  if early then return early end
  local retry = plan_retry()
  if retry then return retry end
  local event = { target = target, target_answer = target_answer, refunds = refunds,
    cdr_items = {}, cdr_total = 0, refunded = {}, sufficient = 1 }
  local parts, shared_code = '', nil  -- parts: ";<block>" per block
  for index, block in base_ipairs(blocks) do
    local code, part = event_block(event, index, block)
    shared_code = fold_code(shared_code, code)
    parts = parts .. part
  end
  local answer = int(overall_code(shared_code)) .. parts .. ';B' .. int(balance) .. ','
    .. event.sufficient
  if event_action == 'DEBIT' or event_action == 'REFUND' then write_event(event, answer) end
  return answer
end
