--[[
charge.lua: every charging request (session Initial / Update / Terminate, one-shot events,
and the closing of a stale session by supervision) in one atomic step, one round trip. It
reads and checks everything first, then writes; a refusal writes nothing. It is kept in
parts by concern (lua/charge/), joined in the order of creditline/store/store.py
CHARGE_SCRIPT_PARTS (prelude, libraries, rating, arguments, state, notifications, event,
session, entry) into one Lua chunk that defines the function charge(keys, args). Redis 7 loads it
once as a library (FUNCTION LOAD) and each request is one FCALL: every function here is
made once, at load. Redis 6.2 has no functions: there the same chunk ends with
`return charge(KEYS, ARGV)` and runs as a script (EVALSHA), its functions made again on
every call (store.py ChargeScript). Either way the parts share the chunk's locals; what
belongs to one request is set again at its start (charge, in entry.lua), and nothing a
request leaves behind is read by the next. The charge notifications and the CDRs are
written here too, in the same step: one exists if and only if its charge happened.

KEYS (all under the account's partition hash tag, so the script runs on Redis Cluster):
  KEYS[1] account hash    balance, credit_limit, state, reserved, initial, topped_up,
                          charged, refunded, adjusted, low_balance (thresholds, "t1,t2,..."),
                          plan (its price plan's id in the catalogue), next_plan and
                          next_plan_from_ms (a change from the next billing period: the
                          plan from that instant on; the first request after it makes it
                          the plan)
  KEYS[2] request key     session hash (kinds I/U/T: last_request, answer, state,
                          started_ms, account, session; per rating group g:<block id>, its
                          state packed (creditline/store/contract.py
                          SESSION_RATING_GROUP_*: units used, money charged, units paid
                          from buckets, money uncharged, money reserved, bucket units
                          reserved; the buckets' rating group, the tariff, the bucket
                          holds); ru: and rc: units and money refunded since) or event
                          answer string (kind E: "<request number>|
                          <answer>", a debit's then "|<refunds>": "<rg>=<units>:<money>,..."
                          refunded of it)
  KEYS[3] buckets hash    bucket id -> "rg|remaining|expires_at_s|priority|initial|kind|
                          serial|reserved" (server/store.py BUCKET_FIELDS): serial numbers
                          the bucket in its account (ids can be reused after an expiry),
                          reserved counts its units held by open sessions
  KEYS[4] usage hash      <rg>:used, <rg>:charged, <rg>:from_buckets, <rg>:uncharged,
                          <rg>:period and <rg>:period_units (units rated in the billing
                          period, which the tiers count; tariffs with tiers only)
  KEYS[5] open sessions   set of the keys of the account's open sessions
  KEYS[6] final sessions  hash: id of an open session holding final units -> its rating
                          groups at final units ("rg,rg")
  KEYS[7] event stream    the partition's charge notifications: one entry per request
                          that made any, fields a (account), s (session), ts (unix ms),
                          n (the number of its last event) and e (its events in order,
                          separated by ';', each "<type>|<field>|<value>|..."; no value
                          holds ';' or '|': rating groups, tariff ids and numbers only;
                          the client's own strings go in fields of the entry)
  KEYS[8] CDR stream      the partition's charging data records
  KEYS[9] rates hash      <rg> -> its usage rates (spike detection), binary: fast, slow,
                          at_ms, since_ms, spike (creditline/store/contract.py
                          USAGE_RATES_FORMAT)
  KEYS[10] event counter  the partition's count of notifications ever written: each one
                          has its number, so a subscriber can tell whether retention
                          dropped any after its cursor
  KEYS[11] deadlines      the partition's sorted set: session key -> supervision deadline
                          (unix ms); a session with no request by then is closed ("S")
  KEYS[12] money hash     the hash holding the account's money: the account's own (KEYS[1]
                          again), or, for a member of a shared group ("<group>/<member>"),
                          its group's account hash: balance, reserved, credit_limit,
                          charged, refunded, state and low_balance are read and written
                          there; the member's own hash keeps its reserved, charged,
                          refunded, and its spending in the billing period (spent,
                          spent_period) against its optional limit (limit)
  KEYS[13], KEYS[14]      REFUND only: the event answer and the session hash of the id the
                          refund names (whichever exists holds the charge it reverses)
  KEYS[13]                kinds I, T, S on one Redis server (not a cluster): the session
                          id's claim, in the id's own partition (server/lua/claim.lua: its
                          format): an Initial refuses an id another account holds open and
                          takes the claim, a close gives it back; on a cluster the server
                          does this in steps of its own, and no KEYS[13] is given

ARGV:
  [1] kind: "I", "U", "T" (session), "E" (event), or "S" (close the session if its
      supervision deadline has passed: charges nothing more, releases what it holds)
  [2] request number
  [3] account id
  [4] session id
  [5] now, unix ms (server clock: bucket expiry, records)
  [6] event time, unix ms (network clock: usage rates for spike detection)
  [7] answer retention, seconds: how long a closed session or an event answer is kept
      so that a retransmission gets the same answer
  [8] event action (kind E): "DEBIT", "REFUND", "CHECK", "PRICE"; "-" otherwise
  [9] event stream trimming: "MAXLEN" or "MINID"
  [10] and its threshold: the entries kept (MAXLEN) or the oldest unix ms kept (MINID)
  [11] usage spike detection: the fast window, s
  [12] the slow window, s
  [13] the factor (0: no spike detection)
  [14] supervision time, ms: a session with no request for this long is closed
  [15] REFUND: the session id of the event or session whose charge it reverses; else ""
  [16] the plan the server priced the request by (the catalogue's id): the account's plan
      ("plan" in its hash) must be the same, else the answer is PLAN_RETRY_ANSWER and the
      account's plan, and nothing is written; "": not checked (a supervision close)
  [17] the catalogue's default plan: the plan of an account with no "plan" field
  [18] a group member's billing period (its plan's, named by its first day): the member's
      limit counts what it spent within it; "" for an account of its own
  [19] number of rating-group blocks, then each block as:
      block id (rating group, or "<rating group>.<service id>"), the rating group whose
      unit buckets apply, tariff id, tariff status ("ok" / "free" / "none"), requested
      units (-1: none), used units, unit kind ("t" time, "v" volume, "s" service
      specific, "-" no tariff), final unit action (FinalUnitAction number), and when the
      status is "ok" the rate table (server/rating.py RateTable.script_args), its form
      first (server/contract.py RateTableForm):
      "F" (one band, no tiers: the same price schedule wherever the session stands, built
      by the server): one argument, binary (creditline/store/contract.py
      FIXED_SCHEDULE_NUMBER doubles): connect fee, then per segment its end (cumulative
      units, infinity for the last), increment units and price per increment;
      "B" (bands or tiers: the script builds the schedule from where the session stands):
      connect fee, first increment units, following increment units, time-based 0/1,
      billing period ("-": no tiers), tier count T and T tier starts (units of the billing
      period), band count B and per band 1 + (T + 1) prices (first increment; following
      increments below the first tier and in each tier), change count C and C pairs
      (seconds from the event time, band index from 0)

Return: the answer as one string "<code>;<block>;<block>...", complete in itself (a
retransmission is answered from it, whatever the retransmission carries; server/charging.py
decodes it). A session block is "block id,code,unit kind,granted,charged,final unit action
(0: none),seconds until the earliest expiry of the buckets the grant draws on (0: none)";
an event block is "block id,code,unit kind,units,amount,from_buckets", and an event answer
ends with ";B<balance>,<sufficient 0/1>". A refusal before any write is "<code>;!<reason>".
Retransmissions get the stored string unchanged.

Numbers are Lua doubles: every integer the caller passes is below 2^53 and costs
saturate at MAX_SAFE; integers are written back with %d (tostring would print 1e+15).
]]

local MAX_SAFE = 9007199254740991
local SUCCESS, DENIED, NOT_APPLICABLE, LIMIT_REACHED = 2001, 4010, 4011, 4012
local UNKNOWN_SESSION, INVALID_VALUE, USER_UNKNOWN, RATING_FAILED = 5002, 5004, 5030, 5031

-- The request's keys and arguments, as KEYS and ARGV are named in a script (set by charge).
local KEYS, ARGV
