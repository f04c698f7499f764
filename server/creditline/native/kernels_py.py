"""Pure-Python twin of native/kernels.pyx: the same functions, the same results.

This is the reference the compiled kernels are checked against (tests/test_rating.py runs
every rating test on both and Hypothesis compares them), and the fallback when the
compiled module is missing and CREDITLINE_ALLOW_PURE_RATING=1 says that is acceptable.

A schedule is a connect fee and up to MAX_SEGMENTS segments, each with a cumulative end
(-1: no end, last segment only), an increment in units and a price per started increment
in micro-units; the semantics are those of creditline.charging.rating.PriceSchedule and of the
charging script (server/creditline/store/lua/charge/). Every integer is kept below 2^53 because the
charging script holds numbers as doubles; costs saturate at MAX_SAFE_INTEGER.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Any

from creditline.store.contract import GROUP_SEPARATOR, ID_CHARACTERS

MAX_SAFE_INTEGER = 2**53 - 1
# Segments per schedule: a bound on the work of one rating (and the C arrays' size).
MAX_SEGMENTS = 64
# What max_units_within returns when the rest of the schedule is free, or when the reach
# is beyond any unit count a request can carry: far above from_units + wanted_units
# (both below 2^53), still inside int64 for the compiled twin.
REACH_UNBOUNDED = 2**62
NO_END = -1


# A budget is a cost (at most MAX_SAFE_INTEGER) plus an amount (as much): affordable()
# asks max_units_within for up to twice MAX_SAFE_INTEGER.
MAX_BUDGET = 2 * MAX_SAFE_INTEGER


def _checked(value: int, name: str, maximum: int = MAX_SAFE_INTEGER) -> int:
    # ints (and bools) only, as the compiled twin's conversion to int64
    if isinstance(value, float) or not isinstance(value, int):
        raise TypeError(f"{name}: an integer is required, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name}: must be between 0 and {maximum}, got {value}")
    return int(value)


class Schedule:
    """A price schedule, checked once so that each rating does no validation."""

    __slots__ = ("_connect_fee_micros", "_count", "_ends", "_increments", "_prices")

    def __init__(self, connect_fee_micros: int, ends: Sequence[int],
                 increments: Sequence[int], prices: Sequence[int]) -> None:
        count = len(ends)
        if len(increments) != count or len(prices) != count:
            raise ValueError("ends, increments and prices: must have the same length")
        if count > MAX_SEGMENTS:
            raise ValueError(f"segments: at most {MAX_SEGMENTS}, got {count}")
        self._connect_fee_micros = _checked(connect_fee_micros, "connect_fee_micros")
        previous_end = 0
        for index in range(count):
            end = ends[index]
            if end == NO_END:
                if index != count - 1:
                    raise ValueError(f"ends[{index}]: only the last segment may have no end")
            elif _checked(end, f"ends[{index}]") <= previous_end:
                raise ValueError(f"ends[{index}]: must be above the previous end")
            else:
                previous_end = end
            if _checked(increments[index], f"increments[{index}]") < 1:
                raise ValueError(f"increments[{index}]: must be at least 1")
            _checked(prices[index], f"prices[{index}]")
        self._count = count
        self._ends = [int(e) for e in ends]
        self._increments = [int(i) for i in increments]
        self._prices = [int(p) for p in prices]

    @property
    def segment_count(self) -> int:
        return self._count

    def cost_to(self, units: int) -> int:
        """Price of the first `units` units: the connect fee once, whole increments."""
        return self._cost_to(_checked(units, "units"))

    def cost(self, from_units: int, units: int) -> int:
        """Price of `units` more units after the first `from_units` are already rated."""
        start = _checked(from_units, "from_units")
        more = _checked(units, "units")
        return self._cost_to(start + more) - self._cost_to(start)

    def max_units_within(self, budget_micros: int) -> int:
        """The largest cumulative unit count, at an increment boundary, whose cost is within
        the budget; REACH_UNBOUNDED when the rest is free."""
        return self._max_units_within(_checked(budget_micros, "budget_micros", MAX_BUDGET))

    def affordable(self, from_units: int, amount_micros: int, wanted_units: int) -> int:
        """Units beyond `from_units` (at most `wanted_units`) that the amount pays for:
        what a grant may promise."""
        start = _checked(from_units, "from_units")
        amount = _checked(amount_micros, "amount_micros")
        wanted = _checked(wanted_units, "wanted_units")
        return self._affordable(start, amount, wanted)

    def _cost_to(self, units: int) -> int:
        if units <= 0:
            return 0
        total = self._connect_fee_micros
        if total >= MAX_SAFE_INTEGER:
            return MAX_SAFE_INTEGER
        start = 0
        for index in range(self._count):
            end = self._ends[index]
            stop = units if end == NO_END or units < end else end
            total += -(-(stop - start) // self._increments[index]) * self._prices[index]
            if total >= MAX_SAFE_INTEGER:
                return MAX_SAFE_INTEGER
            if end == NO_END or units <= end:
                return total
            start = end
        # units beyond the last segment have no price: unaffordable
        return MAX_SAFE_INTEGER

    def _max_units_within(self, budget: int) -> int:
        if budget < self._connect_fee_micros:
            return 0
        spent, start = self._connect_fee_micros, 0
        for index in range(self._count):
            end, increment, price = self._ends[index], self._increments[index], self._prices[index]
            if end == NO_END:
                if price <= 0:
                    return REACH_UNBOUNDED
                buyable = (budget - spent) // price
                return min(REACH_UNBOUNDED, start + buyable * increment)
            increments = -(-(end - start) // increment)
            if price > 0:
                buyable = (budget - spent) // price
                if buyable < increments:
                    return start + buyable * increment
            spent += increments * price
            start = end
        return start

    def _affordable(self, start: int, amount: int, wanted: int) -> int:
        reach = self._max_units_within(self._cost_to(start) + amount)
        return max(0, min(wanted, reach - start))


def cost_batch(schedules: Sequence[Schedule], schedule_index: Sequence[int],
               from_units: Sequence[int], units: Sequence[int]) -> array[int]:
    """cost() of many usages, usage i on schedules[schedule_index[i]]."""
    count = len(schedule_index)
    if len(from_units) != count or len(units) != count:
        raise ValueError("schedule_index, from_units and units: must have the same length")
    out = array("q", bytes(8 * count))
    for i in range(count):
        out[i] = _pick(schedules, schedule_index, i).cost(from_units[i], units[i])
    return out


def affordable_batch(schedules: Sequence[Schedule], schedule_index: Sequence[int],
                     from_units: Sequence[int], amounts_micros: Sequence[int],
                     wanted_units: Sequence[int]) -> array[int]:
    """affordable() of many requests, request i on schedules[schedule_index[i]]."""
    count = len(schedule_index)
    if len(from_units) != count or len(amounts_micros) != count or len(wanted_units) != count:
        raise ValueError("schedule_index, from_units, amounts_micros and wanted_units: "
                         "must have the same length")
    out = array("q", bytes(8 * count))
    for i in range(count):
        out[i] = _pick(schedules, schedule_index, i).affordable(
            from_units[i], amounts_micros[i], wanted_units[i])
    return out


def _pick(schedules: Sequence[Schedule], schedule_index: Sequence[int], i: int) -> Schedule:
    # no negative indexing: a bad index is an error, as in the compiled twin
    index = schedule_index[i]
    if not 0 <= index < len(schedules):
        raise IndexError(f"schedule_index[{i}]: no schedule {index}")
    return schedules[index]


# ---------------------------------------------------------------- the request path
# What the server computes per request around the charging script, twin of the compiled
# module's: the request's checks, and the script's answer string written straight into
# the answer's protobuf wire bytes (the generated classes are the reference:
# tests/test_request_path.py). A refusal is (result code, message naming the field).

SUCCESS = 2001
INVALID_AVP_VALUE = 5004
MISSING_AVP = 5005
UNABLE_TO_COMPLY = 5012
FAILURE_HANDLING_RETRY_AND_TERMINATE = 3
REFUND = 2            # RequestedAction
EVENT_ACTION_MAX = 4  # RequestedAction: 1..4 are actions, 0 is missing
_ACCOUNT_ID_CHARS = frozenset(ID_CHARACTERS)
_ACCOUNT_ID_RULE = ("account_id: only letters, digits and . _ : @ + - are allowed, and one / "
                    "between a group's id and its member's (\"<group id>/<member>\")")
_UNITS_FIELDS = ("time_s", "total_octets", "uplink_octets", "downlink_octets",
                 "service_specific_units")
# A unit code of the script's answer -> the Units field number its units go in.
_UNIT_FIELD_NUMBERS = {"t": 1, "v": 2, "s": 5}
_MASK_64 = 2**64 - 1
# (max_session_id_bytes, max_account_id_bytes, max_event_age_s, max_event_ahead_s,
# max_rating_groups_per_request, the known reporting reasons): creditline.api.messages.rules
RequestRules = tuple[int, int, int, int, int, frozenset[int]]
Refused = tuple[int, str] | None
# (rating group, service id) -> the tariff's (redirect address, restriction filter ids)
FinalUnitOf = Callable[[int, int | None], tuple[str, Sequence[str]]]


def check_session_id(session_id: str, field: str, max_bytes: int) -> Refused:
    """A session id (in `field`): 1..max_bytes of printable text."""
    if not session_id:
        return MISSING_AVP, f"{field}: missing"
    if len(session_id.encode()) > max_bytes:
        return INVALID_AVP_VALUE, f"{field}: longer than {max_bytes} bytes"
    if not session_id.isprintable():
        return INVALID_AVP_VALUE, f"{field}: contains control characters"
    return None


def check_ids(session_id: str, account_id: str, max_session_id_bytes: int,
              max_account_id_bytes: int) -> Refused:
    refusal = check_session_id(session_id, "session_id", max_session_id_bytes)
    if refusal:
        return refusal
    if not account_id:
        return MISSING_AVP, "account_id: missing"
    if len(account_id.encode()) > max_account_id_bytes:
        return INVALID_AVP_VALUE, f"account_id: longer than {max_account_id_bytes} bytes"
    # account ids become part of Redis keys inside the hash tag: no braces, no spaces;
    # "<group id>/<member>" is a group's member
    parts = account_id.split(GROUP_SEPARATOR)
    if len(parts) > 2 or not all(
            part and all(char in _ACCOUNT_ID_CHARS for char in part) for part in parts):
        return INVALID_AVP_VALUE, _ACCOUNT_ID_RULE
    return None


def check_event_time(event_time_unix_ms: int, now_ms: int, max_event_age_s: int,
                     max_event_ahead_s: int) -> Refused:
    """0 means now; anything else must lie in the accepted window around the clock."""
    if event_time_unix_ms == 0:
        return None
    if not (now_ms - max_event_age_s * 1000 <= event_time_unix_ms
            <= now_ms + max_event_ahead_s * 1000):
        return INVALID_AVP_VALUE, (
            f"event_time_unix_ms: {event_time_unix_ms} is outside the accepted window: at "
            f"most max_event_age_s ({max_event_age_s} s) before the server's clock "
            f"({now_ms}) and max_event_ahead_s ({max_event_ahead_s} s) after it; 0 means now")
    return None


def _check_request(request: Any, rules: RequestRules, now_ms: int) -> Refused:
    # rules: creditline.api.messages.request_rules
    return (check_ids(request.session_id, request.account_id, rules[0], rules[1])
            or check_event_time(request.event_time_unix_ms, now_ms, rules[2], rules[3]))


def _check_units(units: Any, where: str) -> Refused:
    for field in _UNITS_FIELDS:
        if getattr(units, field) > MAX_SAFE_INTEGER:
            return (INVALID_AVP_VALUE,
                    f"{where}.{field}: above the limit of {MAX_SAFE_INTEGER}")
    if units.uplink_octets + units.downlink_octets > MAX_SAFE_INTEGER:
        return INVALID_AVP_VALUE, f"{where}: uplink_octets + downlink_octets above the limit"
    return None


def check_blocks(blocks: Sequence[Any], rules: RequestRules, need_units: bool
                 ) -> Refused:
    """The rating-group blocks: at most rules[4], each (rating group, service id) once, a
    known reporting reason (rules[5]), units below 2^53, `requested` when need_units."""
    if len(blocks) > rules[4]:
        return INVALID_AVP_VALUE, f"rating_groups: more than {rules[4]} blocks"
    seen: set[tuple[int, int | None]] = set()
    for index, block in enumerate(blocks):
        where = f"rating_groups[{index}]"
        key = (block.rating_group, block.service_id if block.HasField("service_id") else None)
        if key in seen:
            return (INVALID_AVP_VALUE,
                    f"{where}.rating_group: {block.rating_group} appears twice")
        seen.add(key)
        if block.reporting_reason not in rules[5]:
            return (INVALID_AVP_VALUE,
                    f"{where}.reporting_reason: unknown value {block.reporting_reason}")
        if need_units and not block.HasField("requested"):
            return MISSING_AVP, f"{where}.requested: missing"
        refusal = (_check_units(block.requested, f"{where}.requested")
                   or _check_units(block.used, f"{where}.used"))
        if refusal:
            return refusal
    return None


def validate_credit_control(request: Any, initial: bool, rules: RequestRules, now_ms: int
                            ) -> Refused:
    """The first thing wrong with a CreditControlRequest (Initial when `initial`)."""
    refusal = _check_request(request, rules, now_ms)
    if refusal:
        return refusal
    if initial and request.request_number != 0:
        return INVALID_AVP_VALUE, "request_number: must be 0 on Initial"
    if not initial and request.request_number == 0:
        return INVALID_AVP_VALUE, "request_number: must be above 0 after Initial"
    return check_blocks(request.rating_groups, rules, need_units=False)


def validate_event(request: Any, rules: RequestRules, now_ms: int) -> Refused:
    """The first thing wrong with an EventRequest."""
    refusal = _check_request(request, rules, now_ms)
    if refusal:
        return refusal
    action = request.action
    if action == 0:
        return MISSING_AVP, "action: missing"
    if not 0 < action <= EVENT_ACTION_MAX:
        return INVALID_AVP_VALUE, f"action: unknown value {action}"
    refusal = _check_refund_of(request, rules)
    if refusal:
        return refusal
    if not request.rating_groups:
        return MISSING_AVP, "rating_groups: at least one is required"
    return check_blocks(request.rating_groups, rules, need_units=True)


def _check_refund_of(request: Any, rules: RequestRules) -> Refused:
    """A refund names the charge it reverses; nothing else names one."""
    refund_of = request.refund_of_session_id
    if request.action != REFUND:
        if refund_of:
            return INVALID_AVP_VALUE, "refund_of_session_id: only with action REFUND"
        return None
    if not refund_of:
        return MISSING_AVP, (
            "refund_of_session_id: missing: a REFUND names the session id of the event or "
            "session whose charge it reverses (a credit that reverses no charge is an Admin "
            "adjustment)")
    if refund_of == request.session_id:
        return INVALID_AVP_VALUE, ("refund_of_session_id: the refund's own session_id; a "
                                   "refund has a session id of its own")
    return check_session_id(refund_of, "refund_of_session_id", rules[0])


def _varint(out: bytearray, value: int) -> None:
    value &= _MASK_64  # a negative int64 is its two's complement: ten bytes
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _number(out: bytearray, tag: int, value: int) -> None:
    # a field without presence: absent when 0
    if value:
        out.append(tag)
        _varint(out, value)


def _present(out: bytearray, tag: int, value: int) -> None:
    # an optional field (or a oneof member): written when set, 0 included
    out.append(tag)
    _varint(out, value)


def _chunk(out: bytearray, tag: int, data: bytes | bytearray) -> None:
    out.append(tag)
    _varint(out, len(data))
    out += data


def _text(out: bytearray, tag: int, text: str) -> None:
    if text:
        _chunk(out, tag, text.encode())


def _split_answer(answer: str) -> tuple[int, list[list[str]], str]:
    """'<code>;<block>;...' -> (code, blocks as fields, refusal reason or '')."""
    parts = answer.split(";")
    code = int(parts[0])
    if len(parts) > 1 and parts[1].startswith("!"):
        return code, [], parts[1][1:]
    return code, [p.split(",") for p in parts[1:]], ""


def _block_id(out: bytearray, block_id: str) -> tuple[int, int]:
    """Writes '<rating group>' or '<rating group>.<service id>' (fields 1 and 2) and
    returns (rating group, service id or -1)."""
    rating_group, _, service = block_id.partition(".")
    group = int(rating_group)
    _number(out, 0x08, group)
    if not service:
        return group, -1
    service_id = int(service)
    _present(out, 0x10, service_id)
    return group, service_id


def encode_credit_control(answer: str, session_id: str, request_number: int,
                          plan_times: tuple[int, int, int],
                          final_unit_of: FinalUnitOf) -> bytes:
    """The CreditControlAnswer's wire bytes from the script's answer alone (a stored answer
    encodes the same whatever the retransmission carries). plan_times: the plan's
    (validity_time_s, quota_holding_time_s, quota_threshold_percent); final_unit_of(rating
    group, service id): the tariff's (redirect address, restriction filter ids)."""
    code, fields, reason = _split_answer(answer)
    out = bytearray()
    _text(out, 0x0A, session_id)
    _number(out, 0x10, request_number)
    _number(out, 0x18, code)
    for values in fields:
        _chunk(out, 0x22, _rating_group_answer(values, plan_times, final_unit_of))
    _number(out, 0x28, FAILURE_HANDLING_RETRY_AND_TERMINATE)
    _text(out, 0x32, reason)
    return bytes(out)


def _rating_group_answer(values: Sequence[str], plan_times: tuple[int, int, int],
                         final_unit_of: FinalUnitOf) -> bytearray:
    block_id, code_text, unit, granted_text, charged, final, expires_in_s = values
    out = bytearray()
    group, service_id = _block_id(out, block_id)
    code, granted = int(code_text), int(granted_text)
    _number(out, 0x18, code)
    field = _UNIT_FIELD_NUMBERS.get(unit, 0)
    if field and code == SUCCESS and granted != 0:
        units = bytearray()
        _present(units, field << 3, granted)
        _chunk(out, 0x22, units)
        validity_s, holding_s, threshold_percent = plan_times
        # a grant from a bucket ends no later than the bucket (Validity-Time)
        _number(out, 0x28, min(validity_s, int(expires_in_s) or validity_s))
        if field != 5:  # a volume or time threshold: the client re-asks there
            _present(out, 0x30 if field == 2 else 0x38, granted * threshold_percent // 100)
        _number(out, 0x40, holding_s)
        if final != "0":
            _chunk(out, 0x4A, _final_unit(int(final), group, service_id, final_unit_of))
    _number(out, 0x50, int(charged))
    return out


def _final_unit(action: int, group: int, service_id: int,
                final_unit_of: FinalUnitOf) -> bytearray:
    out = bytearray()
    _number(out, 0x08, action)
    redirect, filter_ids = final_unit_of(group, None if service_id < 0 else service_id)
    _text(out, 0x12, redirect)
    for filter_id in filter_ids:
        _chunk(out, 0x1A, filter_id.encode())  # repeated: empty strings too
    return out


def encode_event(answer: str, session_id: str, request_number: int) -> bytes:
    """The EventAnswer's wire bytes from the script's answer alone."""
    code, fields, reason = _split_answer(answer)
    out = bytearray()
    _text(out, 0x0A, session_id)
    _number(out, 0x10, request_number)
    _number(out, 0x18, code)
    balance, sufficient = 0, False
    if fields and fields[-1][0].startswith("B"):
        balance, sufficient = int(fields[-1][0][1:]), fields[-1][1] == "1"
        fields = fields[:-1]
    for values in fields:
        _chunk(out, 0x22, _event_block_answer(values))
    _number(out, 0x28, balance)
    _number(out, 0x30, 1 if sufficient else 0)
    _text(out, 0x3A, reason)
    return bytes(out)


def _event_block_answer(values: Sequence[str]) -> bytearray:
    block_id, code, unit, units, amount, from_buckets = values
    out = bytearray()
    _block_id(out, block_id)
    _number(out, 0x18, int(code))
    field = _UNIT_FIELD_NUMBERS.get(unit, 0)
    if field:
        inner = bytearray()
        _present(inner, field << 3, int(units))
        _chunk(out, 0x22, inner)
    _number(out, 0x28, int(amount))
    _number(out, 0x30, int(from_buckets))
    return out


def encode_credit_control_refusal(session_id: str, request_number: int, code: int,
                                  message: str) -> bytes:
    """A CreditControlAnswer refusing the request: nothing was charged."""
    # nothing was applied when the store failed: retransmitting is safe, and is what the
    # client should do
    failure = FAILURE_HANDLING_RETRY_AND_TERMINATE if code == UNABLE_TO_COMPLY else 0
    return _refusal(session_id, request_number, code, failure, 0x32, message)


def encode_event_refusal(session_id: str, request_number: int, code: int,
                         message: str) -> bytes:
    """An EventAnswer refusing the request."""
    return _refusal(session_id, request_number, code, 0, 0x3A, message)


def _refusal(session_id: str, request_number: int, code: int, failure_handling: int,
             message_tag: int, message: str) -> bytes:
    # both answers begin with session_id, request_number, result_code (fields 1 to 3);
    # failure_handling is field 5 of a CreditControlAnswer
    out = bytearray()
    _text(out, 0x0A, session_id)
    _number(out, 0x10, request_number)
    _number(out, 0x18, code)
    _number(out, 0x28, failure_handling)
    _text(out, message_tag, message)
    return bytes(out)


def encode_stream_answer(correlation_id: int, field_number: int, answer: bytes) -> bytes:
    """A StreamAnswer holding an encoded answer in its oneof field `field_number`."""
    out = bytearray()
    _number(out, 0x08, correlation_id)
    _chunk(out, field_number << 3 | 2, answer)  # a oneof member: written even when empty
    return bytes(out)


# ---------------------------------------------------------------- the script's block arguments
# The charging script's arguments of a request's rating-group blocks (store/contract.py
# BLOCK_FIELDS, then the rate table of a rated block), twin of the compiled module's: the
# plan is turned once into a BlockPlan (each (rating group, service id)'s tariff versions,
# a fixed tariff's rate table arguments made ahead), and a request's blocks are walked
# against it. Tariff choice is creditline.charging.rating.Plan.tariff_for's; the tables
# that move with the request are the rater's (rate_args), so there is one pricing
# implementation (tests/test_request_path.py holds the three to the same arguments).

# How a version's block is sent: "free", or "ok" with its table made ahead or per request.
FREE, FIXED, RATED = 0, 1, 2
# A version active before any event time: a plan's only version of a tariff.
ACTIVE_ALWAYS_MS = -(2**63)
_NO_SERVICE = -1
# The unit codes the script reads (creditline.api.messages.UNIT_CODES) -> how a block's
# Units count them: a field, or the volume (total_octets, else uplink + downlink).
_UNIT_COUNTED_BY = {"t": "time_s", "v": "", "s": "service_specific_units"}
# (tariff, event time ms, look-back s, billing period) -> the tariff's rate table arguments
RateArgs = Callable[[Any, int, int, str], Sequence[int | str | bytes]]
BillingPeriod = Callable[[int], str]  # event time ms -> the billing period's name


class _Version:
    """One tariff version as its block is sent."""

    __slots__ = ("active_from_ms", "default_grant_units", "final_action", "how",
                 "table_args", "tariff", "tiered", "time_based", "unit_code", "units_field")

    def __init__(self, active_from_ms: int, how: int, unit_code: str, final_action: int,
                 default_grant_units: int, tiered: bool,
                 table_args: Sequence[int | str | bytes] | None, tariff: Any) -> None:
        if how not in (FREE, FIXED, RATED):
            raise ValueError(f"how: FREE, FIXED or RATED, got {how}")
        if unit_code not in _UNIT_COUNTED_BY:
            raise ValueError(f"unit_code: one of t, v, s, got {unit_code!r}")
        if (how == FIXED) != (table_args is not None):
            raise ValueError("table_args: given with FIXED, and only then")
        self.active_from_ms = active_from_ms
        self.how = how
        self.unit_code = unit_code
        self.units_field = _UNIT_COUNTED_BY[unit_code]
        self.time_based = unit_code == "t"
        self.final_action = final_action
        self.default_grant_units = default_grant_units
        self.tiered = tiered
        self.table_args = tuple(table_args or ())
        self.tariff = tariff


class _Versions:
    """A (rating group, service id)'s versions, ascending activation; the ids its blocks
    carry, made once."""

    __slots__ = ("block_id", "tariff_id", "versions")

    def __init__(self, block_id: str, tariff_id: str) -> None:
        self.block_id = block_id
        self.tariff_id = tariff_id
        self.versions: list[_Version] = []

    def at(self, event_time_ms: int) -> _Version | None:
        """The latest version active at the event time."""
        current = None
        for version in self.versions:
            if version.active_from_ms > event_time_ms:
                break
            current = version
        return current


class BlockPlan:
    """A plan as the kernels read it per request: add_version for each tariff version at
    start, then script_blocks per request."""

    __slots__ = ("_billing_period", "_by_group", "_by_service", "_plan_name", "_rate_args")

    def __init__(self, plan_name: str, rate_args: RateArgs,
                 billing_period: BillingPeriod) -> None:
        self._plan_name = plan_name
        self._rate_args = rate_args
        self._billing_period = billing_period
        self._by_group: dict[int, _Versions] = {}    # (rating group, no service id)
        self._by_service: dict[int, _Versions] = {}  # rating group << 32 | service id

    def add_version(self, rating_group: int, service_id: int, active_from_ms: int, how: int,
                    unit_code: str, final_action: int, default_grant_units: int,
                    tiered: bool, table_args: Sequence[int | str | bytes] | None,
                    tariff: Any) -> None:
        """A version of the tariff of (rating group, service id; -1: none), added in
        ascending active_from_ms; table_args: a FIXED version's rate table arguments."""
        if not 0 <= rating_group < 2**32 or not -1 <= service_id < 2**32:
            raise ValueError("rating_group, service_id: must be uint32 (service_id -1: none)")
        block_id = _block_id_of(rating_group, service_id)
        if service_id == _NO_SERVICE:
            table, key = self._by_group, rating_group
        else:
            table, key = self._by_service, rating_group << 32 | service_id
        versions = table.get(key)
        if versions is None:
            versions = table[key] = _Versions(block_id, f"{self._plan_name}/{block_id}")
        if versions.versions and versions.versions[-1].active_from_ms > active_from_ms:
            raise ValueError("active_from_ms: versions are added in ascending order")
        versions.versions.append(_Version(active_from_ms, how, unit_code, final_action,
                                          default_grant_units, tiered, table_args, tariff))

    def script_blocks(self, blocks: Sequence[Any], event_time_ms: int, default_grant: bool
                      ) -> list[int | str | bytes]:
        """The charging script's block arguments: their count, then each block's fields
        (and rate table)."""
        args: list[int | str | bytes] = [len(blocks)]
        period = ""  # the billing period, found once and only for a tariff with tiers
        for block in blocks:
            rating_group = block.rating_group
            service_id = block.service_id if block.HasField("service_id") else _NO_SERVICE
            versions, version = self._version_for(rating_group, service_id, event_time_ms)
            if versions is None:
                block_id = _block_id_of(rating_group, service_id)
                tariff_id = f"{self._plan_name}/{block_id}"
            else:
                block_id, tariff_id = versions.block_id, versions.tariff_id
            if version is None:
                args += [block_id, rating_group, tariff_id, "none", 0, 0, "-", 0]
                continue
            if version.tiered and not period:
                period = self._billing_period(event_time_ms)
            _add_block(args, block, version, block_id, rating_group, tariff_id,
                       default_grant, event_time_ms, period, self._rate_args)
        return args

    def _version_for(self, rating_group: int, service_id: int, event_time_ms: int
                     ) -> tuple[_Versions | None, _Version | None]:
        """(the versions whose ids the block carries, or None: the ids are made; the
        version in force): the service id's tariff, else the rating group's."""
        if service_id != _NO_SERVICE:
            specific = self._by_service.get(rating_group << 32 | service_id)
            version = None if specific is None else specific.at(event_time_ms)
            if version is not None:
                return specific, version
            general = self._by_group.get(rating_group)
            return None, None if general is None else general.at(event_time_ms)
        general = self._by_group.get(rating_group)
        return general, None if general is None else general.at(event_time_ms)


def _block_id_of(rating_group: int, service_id: int) -> str:
    return str(rating_group) if service_id == _NO_SERVICE else f"{rating_group}.{service_id}"


def _add_block(args: list[int | str | bytes], block: Any, version: _Version, block_id: str,
               rating_group: int, tariff_id: str, default_grant: bool, event_time_ms: int,
               period: str, rate_args: RateArgs) -> None:
    requested = -1
    if block.HasField("requested"):
        requested = _units(block.requested, version.units_field)
        if requested == 0 and default_grant and version.how != FREE:
            requested = version.default_grant_units
    used = _units(block.used, version.units_field)
    if version.how == FREE:
        args += [block_id, rating_group, tariff_id, "free", max(requested, 0), used,
                 version.unit_code, version.final_action]
        return
    args += [block_id, rating_group, tariff_id, "ok", requested, used, version.unit_code,
             version.final_action]
    if version.how == FIXED:
        args += version.table_args
        return
    # time-unit usage reported now ended now: the table looks back over it
    lookback_s = used if version.time_based else 0
    args += rate_args(version.tariff, event_time_ms, lookback_s, period)


def _units(units: Any, field: str) -> int:
    """The units counted by `field` ("": the volume: total_octets, else up + down)."""
    if field:
        value: int = getattr(units, field)
        return value
    if units.HasField("total_octets"):
        total: int = units.total_octets
        return total
    up_and_down: int = units.uplink_octets + units.downlink_octets
    return up_and_down
