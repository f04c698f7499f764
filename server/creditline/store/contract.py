"""The contract between the server and the charging script, named once.

charge.lua reads its KEYS and ARGV by position. Here each position has its name, the same
name as the script's local that reads it: `ChargeKeys` and `ChargeArgs` are tuples whose
fields are in the script's order (so building the call is building a tuple), and
`BLOCK_FIELDS` names the arguments of each rating-group block; `SessionBlockAnswer` and
`EventBlockAnswer` name the fields of each block of its answer. The request kinds, the
result codes the script answers with and the numeric limits it shares with the rating code
are defined here too. tests/test_contract.py reads the Lua source and fails when its copies
differ from these.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

# Every integer the script handles is a Lua double: exact below 2^53. Costs saturate here.
MAX_SAFE_INTEGER = 2**53 - 1
# Segments of one price schedule at most: bounds one rating's work (the script's, the
# kernels' and the Python reference's).
MAX_SEGMENTS = 64


class RateTableForm(enum.StrEnum):
    """How a block's rate table is sent: its first argument (charging/rating.py
    RateTable.script_args; charge.lua read_rate_table)."""

    # one band, no tiers: the same price schedule wherever a session stands, sent built
    # (connect fee, segment count S, S times ending / increment units / price; the last
    # ending 0: no end), so the script parses no table and builds no schedule per request
    FIXED = "F"
    # bands or tiers: the table, from which the script builds the schedule of the units
    # from where the session stands
    BANDED = "B"


class RequestKind(enum.StrEnum):
    """What the charging script is asked to do (ARGV kind)."""

    INITIAL = "I"
    UPDATE = "U"
    TERMINATE = "T"
    EVENT = "E"
    # close a session whose supervision deadline has passed (the server's own sweep)
    SUPERVISION_CLOSE = "S"


# The kinds that close a session: what it holds is released, its claim given back.
CLOSING_KINDS = frozenset({RequestKind.TERMINATE, RequestKind.SUPERVISION_CLOSE})


class EventAction(enum.StrEnum):
    """An event's requested action as the script reads it (ARGV event_action)."""

    DEBIT = "DEBIT"
    REFUND = "REFUND"
    CHECK = "CHECK"
    PRICE = "PRICE"
    NONE = "-"  # session requests


# The result codes the script answers with, by the names of its locals (Diameter numbers;
# the protobuf ResultCode enum has the same values).
SCRIPT_RESULT_CODES = {
    "SUCCESS": 2001, "DENIED": 4010, "NOT_APPLICABLE": 4011, "LIMIT_REACHED": 4012,
    "UNKNOWN_SESSION": 5002, "INVALID_VALUE": 5004, "USER_UNKNOWN": 5030,
    "RATING_FAILED": 5031,
}


# What an account or bucket id may be made of: they become part of Redis keys inside the
# hash tag, so no braces and no spaces (checked by the kernels for accounts, by the Admin
# service for buckets).
ID_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+-"

# A member of a shared group (a family, a company) is the account "<group id>/<member>":
# it draws on the group's money and allowances, so its keys share the group's hash tag (its
# partition is the group id's), and the server knows the group from the id alone, with no
# read. Each part is of ID_CHARACTERS; one separator, neither first nor last.
GROUP_SEPARATOR = "/"


def group_of(account_id: str) -> str | None:
    """The group of a member's account id, or None for an account of its own."""
    group, separator, _ = account_id.partition(GROUP_SEPARATOR)
    return group if separator else None


# The notification types the scripts write, as the event's "t" field (the protobuf
# EventType names in lower case; tests/test_contract.py holds the two equal).
EVENT_TYPES = frozenset({
    "quota_granted", "usage_charged", "session_ended", "event_charged", "event_refunded",
    "top_up", "low_balance", "credit_exhausted", "final_units_granted", "bucket_expired",
    "usage_spike", "reauthorization_needed", "adjustment", "plan_changed",
    "purchase", "subscribed", "renewed", "renewal_failed", "subscription_cancelled",
    "subscription_ended", "account_barred",
})


class ChargeKeys(NamedTuple):
    """charge.lua's KEYS[1..12] (the script's locals are these names + `_key`)."""

    account: str
    request: str        # the session hash (I/U/T/S) or the event answer (E)
    buckets: str
    usage: str
    sessions: str       # the account's open sessions
    final: str          # its sessions holding final units
    events: str         # the partition's notification stream
    cdrs: str
    rates: str
    event_counter: str
    deadlines: str
    # the hash holding the account's money: the account's own, or a member's group's
    money: str


class ChargeArgs(NamedTuple):
    """charge.lua's ARGV[1..18]. The blocks follow: their count (ARGV[19], the script's
    block_count), then each block's BLOCK_FIELDS and, when its status is "ok", its rate
    table (charging/rating.py RateTable.script_args, in one of the RateTableForm)."""

    kind: RequestKind
    request_number: int
    account_id: str
    session_id: str
    now_ms: int
    event_time_ms: int
    retention_s: int
    event_action: EventAction
    # (sent apart, not as one string for the script to split: ~8k instructions less)
    trim_strategy: str    # "MAXLEN" or "MINID"
    trim_threshold: int   # MAXLEN: entries kept; MINID: the oldest unix ms kept
    spike_fast_s: int
    spike_slow_s: int
    spike_factor: str     # a decimal number; 0: no spike detection
    supervision_ms: int
    refund_of: str        # REFUND: the session id of the charge it reverses; else ""
    # the plan the server priced the request by, which must be the account's ("": not
    # checked, a supervision close), and the plan of accounts that name none
    assumed_plan: str
    default_plan: str
    # a group member's billing period (its limit counts what it spent in it); "": not a
    # member
    member_period: str


# The charging script's answer when the account is on another plan than the request was
# priced by: a refusal's form ("<code>;!<reason>", nothing written) ending with the
# account's plan id. The server prices the request again by that plan and sends it once more.
PLAN_RETRY_ANSWER = "0;!plan="


def plan_to_retry(answer: str) -> str | None:
    """The account's plan when the answer asks for the request again by it, else None."""
    return answer[len(PLAN_RETRY_ANSWER):] if answer.startswith(PLAN_RETRY_ANSWER) else None


# A FIXED rate table's schedule goes to the script as one binary argument: its numbers
# (connect fee, then per segment end, increment, price; the last end infinity) as
# little-endian doubles of this struct code: no number for the script to parse as text.
FIXED_SCHEDULE_NUMBER = "d"


# A rating group's usage rates (spike detection) as charge.lua keeps them in the rates hash
# (ChargeKeys.rates, field: the rating group), binary (Redis's Lua struct library, the
# same codes as Python's struct): the fast and the slow window's rate (units per second),
# the event time they are at and the one they started from (unix ms), whether a spike is
# announced (0/1). Binary, because formatting and parsing those doubles as text cost the
# script ~30k of its instructions per request. Only the script reads them.
USAGE_RATES_FORMAT = "<ddddB"


# A session's state per rating group, as charge.lua keeps it in the session hash: field
# SESSION_RATING_GROUP_PREFIX + block id, value the SESSION_RATING_GROUP_FORMAT numbers
# (binary) then, "|"-separated, the buckets' rating group, the tariff id and the bucket
# holds ("serial=units,..."). Binary for the script's sake: one field to read and write per
# rating group, no number parsed or formatted as text (~40k instructions per request less).
SESSION_RATING_GROUP_PREFIX = "g:"
SESSION_RATING_GROUP_FORMAT = "<dddddd"


class SessionRatingGroup(NamedTuple):
    used: int              # units used so far
    charged: int           # money charged for them
    from_buckets: int      # of the units, those paid from buckets
    uncharged: int         # money the balance could not pay
    reserved: int          # money reserved by the last grant
    bucket_units: int      # bucket units reserved by the last grant
    bucket_rating_group: str
    tariff: str
    bucket_holds: str      # "serial=units,...": the buckets those units are reserved in


def parse_session_rating_group(value: bytes) -> SessionRatingGroup:
    used, charged, from_buckets, uncharged, reserved, bucket_units = (
        int(n) for n in struct.unpack_from(SESSION_RATING_GROUP_FORMAT, value))
    texts = value[struct.calcsize(SESSION_RATING_GROUP_FORMAT):].decode()
    bucket_rating_group, tariff, bucket_holds = texts.split("|", 2)
    return SessionRatingGroup(used, charged, from_buckets, uncharged, reserved, bucket_units,
                              bucket_rating_group, tariff, bucket_holds)


def session_rating_groups(session: dict[bytes, bytes]) -> dict[str, SessionRatingGroup]:
    """The rating groups' states of a session hash as read (HGETALL, bytes), by block id."""
    prefix = SESSION_RATING_GROUP_PREFIX.encode()
    return {field[len(prefix):].decode(): parse_session_rating_group(value)
            for field, value in session.items() if field.startswith(prefix)}


# Each rating-group block's arguments, in order (charge.lua's block table fields).
BLOCK_FIELDS = ("rg", "bucket_rg", "tariff", "status", "requested", "used", "unit",
                "final_action")


class SessionBlockAnswer(NamedTuple):
    """One block of a session answer ("<code>;<block>;..."), its fields ","-separated in
    this order (the script's names for what it writes)."""

    rg: str             # block id: "<rating group>" or "<rating group>.<service id>"
    code: str
    unit: str           # unit kind: "t", "v", "s"; "-": no tariff
    granted: str
    charged: str
    final: str          # the final unit action granted (FinalUnitAction number), "0": none
    expires_in_s: str   # seconds until the earliest bucket the grant draws on ends; "0"


class EventBlockAnswer(NamedTuple):
    """One block of an event answer ("<code>;<block>;...;B<balance>,<sufficient>")."""

    rg: str
    code: str
    unit: str
    units: str
    amount: str
    from_buckets: str


class AdminKeys(NamedTuple):
    """admin.lua's KEYS (the script's locals are these names + `_key`)."""

    account: str
    buckets: str
    usage: str
    sessions: str
    topups: str
    final: str
    events: str
    event_counter: str
    account_index: str  # the partition's set of account ids
    adjustments: str
    cdrs: str
    purchases: str      # purchase id -> offer id (applied once per id)
    subscriptions: str  # recurring offer id -> its subscription (SUBSCRIPTION_FIELDS)
    renewals: str       # the partition's sorted set of what falls due (renewal_member)
    money: str          # the hash holding the money: the account's own, a member's group's
    members: str        # the group's set of member ids (a member's: its group's)


class AdminArgs(NamedTuple):
    """admin.lua's ARGV[1..6]; the operation's own arguments follow."""

    # CREATE, TOPUP, ADJUST, BUCKET, STATE, PLAN, PURCHASE, SUBSCRIBE, CANCEL, RENEW,
    # PLAN_DUE, LIMIT, GET
    op: str
    account_id: str
    now_ms: int
    event_trim: str
    # the keys of a member's sessions at final units and of its open sessions, as formats
    # of the member id's byte length and the id (string.format): a group's credit or offer
    # asks its members' sessions too
    member_final_key_format: str
    member_sessions_key_format: str


# A subscription to a recurring offer, as admin.lua (admin/subscriptions.lua) writes it in
# the account's subscriptions hash under the offer id: these fields, "|"-separated.
SUBSCRIPTION_FIELDS = ("state", "period_start_ms", "period_end_ms", "periods")
# Its states: paid for its period; cancelled, ending with its period; its renewal refused
# for want of money (no allowances until it is paid again).
SUBSCRIPTION_STATES = ("active", "cancelling", "suspended")
# The buckets of a subscription's allowances: "<offer id>#<n>", n from 1 ('#' is in no id
# a caller gives: ID_CHARACTERS).
ALLOWANCE_BUCKET_SEPARATOR = "#"


class Subscription(NamedTuple):
    state: str
    period_start_ms: int
    period_end_ms: int
    periods: int  # periods paid (the first included)


def parse_subscription(value: str) -> Subscription:
    state, start_ms, end_ms, periods = value.split("|")
    return Subscription(state, int(start_ms), int(end_ms), int(periods))


def renewal_member(offer_id: str, account_id: str) -> str:
    """What falls due, in a partition's renewals set: a subscription's period end
    ("<offer id>|<account id>"), or with offer_id "" the account's scheduled plan change.
    Injective: an offer id is never empty and holds no '|'."""
    return f"{offer_id}|{account_id}"


def due_item(member: str) -> tuple[str, str]:
    """(offer id, or "" for a scheduled plan change; account id) of a renewals member."""
    offer_id, _, account_id = member.partition("|")
    return offer_id, account_id


# The account hash's plan fields: its plan, and a change scheduled from an instant on
# (ChangePlan from_next_period). admin.lua writes them; charge.lua, admin.lua and the
# server read them by one rule, plan_in_force (tests/test_contract.py holds the scripts'
# names to these).
PLAN_FIELD, NEXT_PLAN_FIELD, NEXT_PLAN_FROM_FIELD = "plan", "next_plan", "next_plan_from_ms"


def plan_in_force(plan: str | None, next_plan: str | None, next_plan_from_ms: str | int | None,
                  default_plan: str, now_ms: int) -> str:
    """The account's plan at now_ms: the one scheduled when its instant has come, else its
    plan, else (an account made before plans) the catalogue's default."""
    if next_plan and next_plan_from_ms is not None and now_ms >= int(next_plan_from_ms):
        return next_plan
    return plan or default_plan


class IdentityKind(enum.StrEnum):
    """A subscriber identity's type (RFC 4006 §8.47 Subscription-Id-Type), by the word the
    identity table's keys name it with (store.identity_key)."""

    E164 = "e164"          # an MSISDN: END_USER_E164
    IMSI = "imsi"          # END_USER_IMSI
    SIP_URI = "sip_uri"    # END_USER_SIP_URI
    NAI = "nai"            # END_USER_NAI (RFC 7542)
    PRIVATE = "private"    # END_USER_PRIVATE: the operator's own


# RFC 4006's Subscription-Id-Type numbers (what a Diameter gateway sends) -> kind.
SUBSCRIPTION_ID_TYPES = {0: IdentityKind.E164, 1: IdentityKind.IMSI, 2: IdentityKind.SIP_URI,
                         3: IdentityKind.NAI, 4: IdentityKind.PRIVATE}
# The Admin API's IdentityType numbers are RFC 4006's plus this: protobuf keeps 0 for
# IDENTITY_TYPE_UNSPECIFIED, so END_USER_E164 is 1 there, 0 on the wire of Gy.
ADMIN_IDENTITY_TYPE_OFFSET = 1

# What Subscription-Id-Data may be: it becomes the last part of a Redis key (after the hash
# tag, so any character is safe there), and these limits keep it a sane identity.
MAX_IDENTITY_DATA_BYTES = 128
# E.164 numbers are digits only, at most 15 (ITU-T E.164 §6); IMSIs 6 to 15 digits
# (3GPP TS 23.003 §2.2: MCC 3 + MNC 2..3 + MSIN, 15 at most; 6 admits test networks' short
# ones)
MIN_E164_DIGITS, MAX_E164_DIGITS = 1, 15
MIN_IMSI_DIGITS, MAX_IMSI_DIGITS = 6, 15
_DIGITS = frozenset("0123456789")
_DIGIT_COUNTS = {IdentityKind.E164: (MIN_E164_DIGITS, MAX_E164_DIGITS),
                 IdentityKind.IMSI: (MIN_IMSI_DIGITS, MAX_IMSI_DIGITS)}


def identity_data_problem(kind: IdentityKind, data: str) -> str | None:
    """Why `data` cannot be an identity of this kind (the reason, without the field's
    name), or None."""
    if not 1 <= len(data.encode()) <= MAX_IDENTITY_DATA_BYTES:
        return f"1..{MAX_IDENTITY_DATA_BYTES} bytes (UTF-8)"
    if not data.isprintable() or any(char.isspace() for char in data):
        return "printable characters only, no whitespace"
    digits = _DIGIT_COUNTS.get(kind)
    if digits is not None and not (set(data) <= _DIGITS and digits[0] <= len(data) <= digits[1]):
        return f"a {kind.name} identity is {digits[0]}..{digits[1]} digits (0-9) only"
    return None
