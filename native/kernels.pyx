# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Compiled rating kernels: the cost of a usage and its inverse over a price schedule.

The pure-Python twin (native/kernels_py.py) is the reference: same functions, same results
(tests/test_rating.py compares them on 10,000 generated schedules and usages). It walks
the segments one by one as rating.py and the charging script do; here the cost of each
segment bought whole is summed once per schedule (_prefix), so a rating compares its way
to its last segment and divides only there. Everything here is int64 arithmetic on values below
2^53, arranged so that no intermediate overflows: a product is formed only after a
division has shown that it fits.

cdivision=True is safe because every division has a positive divisor (increments are at
least 1, prices are tested > 0 before dividing) and non-negative dividends, where C and
Python division agree.
"""

from array import array

from libc.stdint cimport int64_t

cdef enum:
    SEGMENTS_MAX = 64  # segments per schedule: bounds one rating's work

cdef int64_t MAX_SAFE = 9007199254740991          # 2^53 - 1
cdef int64_t UNBOUNDED = 4611686018427387904      # 2^62
cdef int64_t PRODUCT_SAFE = 2147483648            # 2^31

MAX_SAFE_INTEGER = MAX_SAFE
MAX_SEGMENTS = SEGMENTS_MAX
REACH_UNBOUNDED = UNBOUNDED
NO_END = -1


# A budget is a cost (at most MAX_SAFE) plus an amount (as much): _affordable asks
# _max_units_within for up to twice MAX_SAFE.
cdef int64_t MAX_BUDGET = 2 * MAX_SAFE


cdef inline int64_t _checked(object value, str name, int64_t maximum=MAX_SAFE) except -1:
    cdef int64_t result
    if isinstance(value, float) or not isinstance(value, int):
        raise TypeError(f"{name}: an integer is required, got {type(value).__name__}")
    try:
        result = value
    except OverflowError:
        raise ValueError(
            f"{name}: must be between 0 and {maximum}, got {value}") from None
    if result < 0 or result > maximum:
        raise ValueError(f"{name}: must be between 0 and {maximum}, got {value}")
    return result


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    # a >= 0, b >= 1
    return (a + b - 1) // b


cdef class Schedule:
    """A price schedule, checked once so that each rating does no validation."""

    cdef int64_t _connect_fee
    cdef int _count
    cdef int64_t _ends[SEGMENTS_MAX]        # NO_END (-1) on the last segment: no end
    cdef int64_t _increments[SEGMENTS_MAX]
    cdef int64_t _prices[SEGMENTS_MAX]
    # The connect fee plus the price of segments 0..i bought whole, capped at UNBOUNDED
    # (above any budget): computed once, so a rating divides only in its last segment.
    cdef int64_t _prefix[SEGMENTS_MAX]

    def __init__(self, connect_fee_micros, ends, increments, prices):
        cdef Py_ssize_t count = len(ends), index
        cdef int64_t previous_end = 0, end
        if len(increments) != count or len(prices) != count:
            raise ValueError("ends, increments and prices: must have the same length")
        if count > SEGMENTS_MAX:
            raise ValueError(f"segments: at most {SEGMENTS_MAX}, got {count}")
        self._connect_fee = _checked(connect_fee_micros, "connect_fee_micros")
        for index in range(count):
            if ends[index] == NO_END:
                if index != count - 1:
                    raise ValueError(
                        f"ends[{index}]: only the last segment may have no end")
                end = -1
            else:
                end = _checked(ends[index], f"ends[{index}]")
                if end <= previous_end:
                    raise ValueError(f"ends[{index}]: must be above the previous end")
                previous_end = end
            self._ends[index] = end
            self._increments[index] = _checked(increments[index], f"increments[{index}]")
            if self._increments[index] < 1:
                raise ValueError(f"increments[{index}]: must be at least 1")
            self._prices[index] = _checked(prices[index], f"prices[{index}]")
        self._count = <int>count
        self._fill_prefix()

    cdef void _fill_prefix(self) noexcept nogil:
        cdef int64_t total = self._connect_fee, start = 0, added, price
        cdef int index
        for index in range(self._count):
            if self._ends[index] < 0:
                self._prefix[index] = UNBOUNDED
                break
            price = self._prices[index]
            added = 0
            if price > 0:
                added = _ceil_div(self._ends[index] - start, self._increments[index])
                added = UNBOUNDED if added > UNBOUNDED // price else added * price
            total = UNBOUNDED if added >= UNBOUNDED - total else total + added
            self._prefix[index] = total
            start = self._ends[index]

    @property
    def segment_count(self):
        return self._count

    def cost_to(self, units):
        """Price of the first `units` units: the connect fee once, whole increments."""
        return self._cost_to(_checked(units, "units"))

    def cost(self, from_units, units):
        """Price of `units` more units after the first `from_units` are already rated."""
        cdef int64_t start = _checked(from_units, "from_units")
        cdef int64_t more = _checked(units, "units")
        return self._cost_to(start + more) - self._cost_to(start)

    def max_units_within(self, budget_micros):
        """The largest cumulative unit count, at an increment boundary, whose cost is
        within the budget; REACH_UNBOUNDED when the rest is free."""
        return self._max_units_within(_checked(budget_micros, "budget_micros", MAX_BUDGET))

    def affordable(self, from_units, amount_micros, wanted_units):
        """Units beyond `from_units` (at most `wanted_units`) that the amount pays for:
        what a grant may promise."""
        cdef int64_t start = _checked(from_units, "from_units")
        cdef int64_t amount = _checked(amount_micros, "amount_micros")
        cdef int64_t wanted = _checked(wanted_units, "wanted_units")
        return self._affordable(start, amount, wanted)

    cdef int64_t _cost_to(self, int64_t units) noexcept nogil:
        # Same result as the segment-by-segment walk of the twin: the prefix holds what
        # the segments before cost, saturation included (all terms are non-negative).
        cdef int64_t before = self._connect_fee, start = 0, end, count, price, total
        cdef int index
        if units <= 0:
            return 0
        for index in range(self._count):
            end = self._ends[index]
            if end < 0 or units <= end:
                if before >= MAX_SAFE:
                    return MAX_SAFE
                count = _ceil_div(units - start, self._increments[index])
                price = self._prices[index]
                if (count | price) < PRODUCT_SAFE:
                    # both below 2^31: the product and the sum fit in int64
                    total = before + count * price
                    return MAX_SAFE if total >= MAX_SAFE else total
                # before + count * price >= MAX_SAFE, decided without the product
                if price > 0 and count >= _ceil_div(MAX_SAFE - before, price):
                    return MAX_SAFE
                return before + count * price
            before = self._prefix[index]
            start = end
        return MAX_SAFE  # units beyond the last segment have no price: unaffordable

    cdef int64_t _max_units_within(self, int64_t budget) noexcept nogil:
        cdef int64_t spent = self._connect_fee, start = 0, end, increment, price, buyable
        cdef int index
        if budget < spent:
            return 0
        for index in range(self._count):
            end = self._ends[index]
            increment = self._increments[index]
            price = self._prices[index]
            if end < 0:
                if price <= 0:
                    return UNBOUNDED
                buyable = (budget - spent) // price
                if buyable > (UNBOUNDED - start) // increment:
                    return UNBOUNDED
                return start + buyable * increment
            if self._prefix[index] > budget:
                # the segment cannot be bought whole, so its price is above 0 and
                # buyable is below its increment count
                buyable = (budget - spent) // price
                return start + buyable * increment
            spent = self._prefix[index]
            start = end
        return start

    cdef inline int64_t _affordable(self, int64_t start, int64_t amount,
                                    int64_t wanted) noexcept nogil:
        cdef int64_t reach = self._max_units_within(self._cost_to(start) + amount)
        cdef int64_t units = reach - start
        if units > wanted:
            units = wanted
        return units if units > 0 else 0


def cost_batch(list schedules, const long long[:] schedule_index,
               const long long[:] from_units, const long long[:] units):
    """cost() of many usages, usage i on schedules[schedule_index[i]]."""
    cdef Py_ssize_t count = schedule_index.shape[0], i, n_schedules = len(schedules)
    cdef Schedule schedule
    cdef int64_t start, more
    if from_units.shape[0] != count or units.shape[0] != count:
        raise ValueError("schedule_index, from_units and units: must have the same length")
    out = array("q", bytes(8 * count))
    cdef long long[:] result = out
    for i in range(count):
        if schedule_index[i] < 0 or schedule_index[i] >= n_schedules:
            raise IndexError(f"schedule_index[{i}]: no schedule {schedule_index[i]}")
        schedule = <Schedule?>schedules[schedule_index[i]]
        start, more = from_units[i], units[i]
        if start < 0 or start > MAX_SAFE or more < 0 or more > MAX_SAFE:
            raise ValueError(f"usage {i}: units must be between 0 and {MAX_SAFE}")
        result[i] = schedule._cost_to(start + more) - schedule._cost_to(start)
    return out


def affordable_batch(list schedules, const long long[:] schedule_index,
                     const long long[:] from_units, const long long[:] amounts_micros,
                     const long long[:] wanted_units):
    """affordable() of many requests, request i on schedules[schedule_index[i]]."""
    cdef Py_ssize_t count = schedule_index.shape[0], i, n_schedules = len(schedules)
    cdef Schedule schedule
    cdef int64_t start, amount, wanted
    if (from_units.shape[0] != count or amounts_micros.shape[0] != count
            or wanted_units.shape[0] != count):
        raise ValueError("schedule_index, from_units, amounts_micros and wanted_units: "
                         "must have the same length")
    out = array("q", bytes(8 * count))
    cdef long long[:] result = out
    for i in range(count):
        if schedule_index[i] < 0 or schedule_index[i] >= n_schedules:
            raise IndexError(f"schedule_index[{i}]: no schedule {schedule_index[i]}")
        schedule = <Schedule?>schedules[schedule_index[i]]
        start, amount, wanted = from_units[i], amounts_micros[i], wanted_units[i]
        if (start < 0 or start > MAX_SAFE or amount < 0 or amount > MAX_SAFE
                or wanted < 0 or wanted > MAX_SAFE):
            raise ValueError(f"request {i}: values must be between 0 and {MAX_SAFE}")
        result[i] = schedule._affordable(start, amount, wanted)
    return out


# ---------------------------------------------------------------- the request path
# Twin of kernels_py.py's request path (same functions, same results, same messages): the
# request's checks, and the script's answer string written straight into the answer's
# protobuf wire bytes through a C buffer (the generated classes are the reference:
# tests/test_request_path.py). A refusal is (result code, message naming the field).

from libc.stdint cimport uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

SUCCESS = 2001
INVALID_AVP_VALUE = 5004
MISSING_AVP = 5005
UNABLE_TO_COMPLY = 5012
FAILURE_HANDLING_RETRY_AND_TERMINATE = 3
REFUND = 2
EVENT_ACTION_MAX = 4

cdef int _SUCCESS = 2001
cdef int _INVALID = 5004
cdef int _MISSING = 5005
cdef int _RETRY_AND_TERMINATE = 3


_ACCOUNT_ID_RULE = ("account_id: only letters, digits and . _ : @ + - are allowed, and one / "
                    "between a group's id and its member's (\"<group id>/<member>\")")


cdef inline bint _account_char(Py_UCS4 c) noexcept:
    # account ids become part of Redis keys inside the hash tag: no braces, no spaces
    return (u'a' <= c <= u'z' or u'A' <= c <= u'Z' or u'0' <= c <= u'9'
            or c == u'.' or c == u'_' or c == u':' or c == u'@' or c == u'+' or c == u'-')


def check_session_id(str session_id, str field, Py_ssize_t max_bytes):
    """A session id (in `field`): 1..max_bytes of printable text."""
    if not session_id:
        return _MISSING, f"{field}: missing"
    if len(session_id.encode()) > max_bytes:
        return _INVALID, f"{field}: longer than {max_bytes} bytes"
    if not session_id.isprintable():
        return _INVALID, f"{field}: contains control characters"
    return None


def check_ids(str session_id, str account_id, Py_ssize_t max_session_id_bytes,
              Py_ssize_t max_account_id_bytes):
    cdef Py_UCS4 c
    refusal = check_session_id(session_id, "session_id", max_session_id_bytes)
    if refusal:
        return refusal
    if not account_id:
        return _MISSING, "account_id: missing"
    if len(account_id.encode()) > max_account_id_bytes:
        return _INVALID, f"account_id: longer than {max_account_id_bytes} bytes"
    cdef Py_ssize_t separators = 0
    for c in account_id:
        if c == u'/':  # contract.GROUP_SEPARATOR: a group's member
            separators += 1
        elif not _account_char(c):
            return _INVALID, _ACCOUNT_ID_RULE
    if separators and (separators > 1 or account_id[0] == u'/'
                       or account_id[len(account_id) - 1] == u'/'):
        return _INVALID, _ACCOUNT_ID_RULE
    return None


def check_event_time(long long event_time_unix_ms, long long now_ms,
                     long long max_event_age_s, long long max_event_ahead_s):
    """0 means now; anything else must lie in the accepted window around the clock."""
    if event_time_unix_ms == 0:
        return None
    if not (now_ms - max_event_age_s * 1000 <= event_time_unix_ms
            <= now_ms + max_event_ahead_s * 1000):
        return _INVALID, (
            f"event_time_unix_ms: {event_time_unix_ms} is outside the accepted window: at "
            f"most max_event_age_s ({max_event_age_s} s) before the server's clock "
            f"({now_ms}) and max_event_ahead_s ({max_event_ahead_s} s) after it; 0 means now")
    return None


cdef object _check_request(object request, tuple rules, long long now_ms):
    return (check_ids(request.session_id, request.account_id, rules[0], rules[1])
            or check_event_time(request.event_time_unix_ms, now_ms, rules[2], rules[3]))


cdef object _check_units(object units, str where):
    cdef uint64_t uplink = units.uplink_octets, downlink = units.downlink_octets
    cdef uint64_t limit = <uint64_t>MAX_SAFE
    if units.time_s > limit:
        return _INVALID, f"{where}.time_s: above the limit of {MAX_SAFE}"
    if units.total_octets > limit:
        return _INVALID, f"{where}.total_octets: above the limit of {MAX_SAFE}"
    if uplink > limit:
        return _INVALID, f"{where}.uplink_octets: above the limit of {MAX_SAFE}"
    if downlink > limit:
        return _INVALID, f"{where}.downlink_octets: above the limit of {MAX_SAFE}"
    if units.service_specific_units > limit:
        return _INVALID, f"{where}.service_specific_units: above the limit of {MAX_SAFE}"
    if uplink + downlink > limit:
        return _INVALID, f"{where}: uplink_octets + downlink_octets above the limit"
    return None


def check_blocks(blocks, tuple rules, bint need_units):
    """The rating-group blocks: at most rules[4], each (rating group, service id) once, a
    known reporting reason (rules[5]), units below 2^53, `requested` when need_units."""
    cdef Py_ssize_t index
    if len(blocks) > rules[4]:
        return _INVALID, f"rating_groups: more than {rules[4]} blocks"
    seen = set()
    reasons = rules[5]
    for index, block in enumerate(blocks):
        key = (block.rating_group, block.service_id if block.HasField("service_id") else None)
        if key in seen:
            return (_INVALID, f"rating_groups[{index}].rating_group: "
                    f"{block.rating_group} appears twice")
        seen.add(key)
        if block.reporting_reason not in reasons:
            return (_INVALID, f"rating_groups[{index}].reporting_reason: unknown value "
                    f"{block.reporting_reason}")
        if need_units and not block.HasField("requested"):
            return _MISSING, f"rating_groups[{index}].requested: missing"
        refusal = (_check_units(block.requested, f"rating_groups[{index}].requested")
                   or _check_units(block.used, f"rating_groups[{index}].used"))
        if refusal:
            return refusal
    return None


def validate_credit_control(request, bint initial, tuple rules, long long now_ms):
    """The first thing wrong with a CreditControlRequest (Initial when `initial`)."""
    refusal = _check_request(request, rules, now_ms)
    if refusal:
        return refusal
    cdef unsigned long long number = request.request_number
    if initial and number != 0:
        return _INVALID, "request_number: must be 0 on Initial"
    if not initial and number == 0:
        return _INVALID, "request_number: must be above 0 after Initial"
    return check_blocks(request.rating_groups, rules, False)


def validate_event(request, tuple rules, long long now_ms):
    """The first thing wrong with an EventRequest."""
    refusal = _check_request(request, rules, now_ms)
    if refusal:
        return refusal
    cdef long long action = request.action
    if action == 0:
        return _MISSING, "action: missing"
    if not 0 < action <= EVENT_ACTION_MAX:
        return _INVALID, f"action: unknown value {action}"
    refusal = _check_refund_of(request, rules, action)
    if refusal:
        return refusal
    if not request.rating_groups:
        return _MISSING, "rating_groups: at least one is required"
    return check_blocks(request.rating_groups, rules, True)


cdef object _check_refund_of(object request, tuple rules, long long action):
    """A refund names the charge it reverses; nothing else names one."""
    cdef str refund_of = request.refund_of_session_id
    if action != REFUND:
        if refund_of:
            return _INVALID, "refund_of_session_id: only with action REFUND"
        return None
    if not refund_of:
        return _MISSING, (
            "refund_of_session_id: missing: a REFUND names the session id of the event or "
            "session whose charge it reverses (a credit that reverses no charge is an Admin "
            "adjustment)")
    if refund_of == request.session_id:
        return _INVALID, ("refund_of_session_id: the refund's own session_id; a "
                          "refund has a session id of its own")
    return check_session_id(refund_of, "refund_of_session_id", rules[0])


# A growing byte buffer in C: an answer is written field by field, its submessages into
# buffers of their own and then copied in behind their length.
cdef struct Buffer:
    unsigned char* data
    Py_ssize_t size
    Py_ssize_t capacity


cdef int _reserve(Buffer* out, Py_ssize_t more) except -1:
    cdef Py_ssize_t capacity
    cdef unsigned char* grown
    if out.size + more <= out.capacity:
        return 0
    capacity = out.capacity * 2 if out.capacity else 256
    if capacity < out.size + more:
        capacity = out.size + more
    grown = <unsigned char*>realloc(out.data, capacity)
    if grown == NULL:
        raise MemoryError()
    out.data, out.capacity = grown, capacity
    return 0


cdef int _varint(Buffer* out, uint64_t value) except -1:
    _reserve(out, 10)
    while value > 0x7F:
        out.data[out.size] = <unsigned char>((value & 0x7F) | 0x80)
        out.size += 1
        value >>= 7
    out.data[out.size] = <unsigned char>value
    out.size += 1
    return 0


cdef inline int _present(Buffer* out, unsigned char tag, uint64_t value) except -1:
    # an optional field (or a oneof member): written when set, 0 included
    _reserve(out, 1)
    out.data[out.size] = tag
    out.size += 1
    return _varint(out, value)


cdef inline int _number(Buffer* out, unsigned char tag, uint64_t value) except -1:
    # a field without presence: absent when 0 (a negative int64 is its two's complement)
    if value:
        _present(out, tag, value)
    return 0


cdef int _chunk(Buffer* out, unsigned char tag, const unsigned char* data,
                Py_ssize_t size) except -1:
    _present(out, tag, <uint64_t>size)
    _reserve(out, size)
    if size:
        memcpy(out.data + out.size, data, size)
    out.size += size
    return 0


cdef int _text(Buffer* out, unsigned char tag, str text) except -1:
    cdef bytes data
    if text:
        data = text.encode()
        _chunk(out, tag, data, len(data))
    return 0


cdef inline void _clear(Buffer* out) noexcept:
    out.size = 0


cdef class _Writer:
    """The buffers of one answer: the message, a block, a block's submessage."""
    cdef Buffer message
    cdef Buffer block
    cdef Buffer inner

    def __dealloc__(self):
        free(self.message.data)
        free(self.block.data)
        free(self.inner.data)

    cdef bytes result(self):
        return (<char*>self.message.data)[:self.message.size] if self.message.size else b""


cdef tuple _split_answer(str answer):
    """'<code>;<block>;...' -> (code, blocks as fields, refusal reason or '')."""
    cdef list parts = answer.split(";")
    code = int(parts[0])
    if len(parts) > 1 and (<str>parts[1]).startswith("!"):
        return code, [], (<str>parts[1])[1:]
    return code, [(<str>p).split(",") for p in parts[1:]], ""


cdef inline int _unit_field(str unit) noexcept:
    if unit == "t":
        return 1
    if unit == "v":
        return 2
    if unit == "s":
        return 5
    return 0


cdef long long _block_id(Buffer* out, str block_id, long long* service_id) except? -2:
    """Writes '<rating group>' or '<rating group>.<service id>' (fields 1 and 2); the
    rating group, its service id in *service_id (-1: none)."""
    rating_group, _, service = block_id.partition(".")
    cdef long long group = int(rating_group)
    _number(out, 0x08, <uint64_t>group)
    service_id[0] = -1
    if service:
        service_id[0] = int(service)
        _present(out, 0x10, <uint64_t>service_id[0])
    return group


def encode_credit_control(str answer, str session_id, unsigned long long request_number,
                          tuple plan_times, final_unit_of):
    """The CreditControlAnswer's wire bytes from the script's answer alone (a stored answer
    encodes the same whatever the retransmission carries). plan_times: the plan's
    (validity_time_s, quota_holding_time_s, quota_threshold_percent); final_unit_of(rating
    group, service id): the tariff's (redirect address, restriction filter ids)."""
    cdef _Writer writer = _Writer()
    code, fields, reason = _split_answer(answer)
    _text(&writer.message, 0x0A, session_id)
    _number(&writer.message, 0x10, request_number)
    _number(&writer.message, 0x18, <uint64_t><long long>code)
    for values in fields:
        _rating_group_answer(writer, values, plan_times, final_unit_of)
        _chunk(&writer.message, 0x22, writer.block.data, writer.block.size)
    _number(&writer.message, 0x28, _RETRY_AND_TERMINATE)
    _text(&writer.message, 0x32, reason)
    return writer.result()


cdef int _rating_group_answer(_Writer writer, list values, tuple plan_times,
                              object final_unit_of) except -1:
    cdef Buffer* out = &writer.block
    cdef long long service_id, code, granted, validity_s, expires_s
    cdef int field
    block_id, code_text, unit, granted_text, charged, final, expires_in_s = values
    _clear(out)
    group = _block_id(out, block_id, &service_id)
    code, granted = int(code_text), int(granted_text)
    _number(out, 0x18, <uint64_t>code)
    field = _unit_field(unit)
    if field and code == _SUCCESS and granted != 0:
        _clear(&writer.inner)
        _present(&writer.inner, <unsigned char>(field << 3), <uint64_t>granted)
        _chunk(out, 0x22, writer.inner.data, writer.inner.size)
        validity_s = plan_times[0]
        # a grant from a bucket ends no later than the bucket (Validity-Time)
        expires_s = int(expires_in_s)
        _number(out, 0x28, <uint64_t>(validity_s if expires_s == 0 or expires_s > validity_s
                                      else expires_s))
        if field != 5:  # a volume or time threshold: the client re-asks there
            _present(out, 0x30 if field == 2 else 0x38,
                     <uint64_t>(granted * <long long>plan_times[2] // 100))
        _number(out, 0x40, <uint64_t><long long>plan_times[1])
        if final != "0":
            _final_unit(writer, int(final), group, service_id, final_unit_of)
            _chunk(out, 0x4A, writer.inner.data, writer.inner.size)
    _number(out, 0x50, <uint64_t><long long>int(charged))
    return 0


cdef int _final_unit(_Writer writer, long long action, long long group, long long service_id,
                     object final_unit_of) except -1:
    cdef Buffer* out = &writer.inner
    cdef bytes data
    _clear(out)
    _number(out, 0x08, <uint64_t>action)
    redirect, filter_ids = final_unit_of(group, None if service_id < 0 else service_id)
    _text(out, 0x12, redirect)
    for filter_id in filter_ids:
        data = (<str>filter_id).encode()
        _chunk(out, 0x1A, data, len(data))  # repeated: empty strings too
    return 0


def encode_event(str answer, str session_id, unsigned long long request_number):
    """The EventAnswer's wire bytes from the script's answer alone."""
    cdef _Writer writer = _Writer()
    cdef long long balance = 0
    cdef bint sufficient = False
    code, fields, reason = _split_answer(answer)
    _text(&writer.message, 0x0A, session_id)
    _number(&writer.message, 0x10, request_number)
    _number(&writer.message, 0x18, <uint64_t><long long>code)
    cdef list blocks = fields
    cdef Py_ssize_t count = len(blocks)
    # (no negative indexes: wraparound is off) the balance comes last
    if count and (<str>blocks[count - 1][0]).startswith("B"):
        last = blocks[count - 1]
        balance, sufficient = int(last[0][1:]), last[1] == "1"
        count -= 1
    for values in blocks[:count]:
        _event_block_answer(writer, values)
        _chunk(&writer.message, 0x22, writer.block.data, writer.block.size)
    _number(&writer.message, 0x28, <uint64_t>balance)
    _number(&writer.message, 0x30, 1 if sufficient else 0)
    _text(&writer.message, 0x3A, reason)
    return writer.result()


cdef int _event_block_answer(_Writer writer, list values) except -1:
    cdef Buffer* out = &writer.block
    cdef long long service_id
    cdef int field
    block_id, code, unit, units, amount, from_buckets = values
    _clear(out)
    _block_id(out, block_id, &service_id)
    _number(out, 0x18, <uint64_t><long long>int(code))
    field = _unit_field(unit)
    if field:
        _clear(&writer.inner)
        _present(&writer.inner, <unsigned char>(field << 3), <uint64_t><long long>int(units))
        _chunk(out, 0x22, writer.inner.data, writer.inner.size)
    _number(out, 0x28, <uint64_t><long long>int(amount))
    _number(out, 0x30, <uint64_t><long long>int(from_buckets))
    return 0


def encode_credit_control_refusal(str session_id, unsigned long long request_number,
                                  long long code, str message):
    """A CreditControlAnswer refusing the request: nothing was charged."""
    # nothing was applied when the store failed: retransmitting is safe, and is what the
    # client should do
    cdef int failure = _RETRY_AND_TERMINATE if code == UNABLE_TO_COMPLY else 0
    return _refusal(session_id, request_number, code, failure, 0x32, message)


def encode_event_refusal(str session_id, unsigned long long request_number, long long code,
                         str message):
    """An EventAnswer refusing the request."""
    return _refusal(session_id, request_number, code, 0, 0x3A, message)


cdef bytes _refusal(str session_id, unsigned long long request_number, long long code,
                    int failure_handling, unsigned char message_tag, str message):
    # both answers begin with session_id, request_number, result_code (fields 1 to 3);
    # failure_handling is field 5 of a CreditControlAnswer
    cdef _Writer writer = _Writer()
    _text(&writer.message, 0x0A, session_id)
    _number(&writer.message, 0x10, request_number)
    _number(&writer.message, 0x18, <uint64_t>code)
    _number(&writer.message, 0x28, <uint64_t>failure_handling)
    _text(&writer.message, message_tag, message)
    return writer.result()


def encode_stream_answer(unsigned long long correlation_id, int field_number, bytes answer):
    """A StreamAnswer holding an encoded answer in its oneof field `field_number`."""
    cdef _Writer writer = _Writer()
    _number(&writer.message, 0x08, correlation_id)
    # a oneof member: written even when empty
    _chunk(&writer.message, <unsigned char>(field_number << 3 | 2), answer, len(answer))
    return writer.result()


# ---------------------------------------------------------------- the script's block arguments
# Twin of kernels_py.py's BlockPlan (same methods, same arguments): the plan turned once
# into each (rating group, service id)'s versions, a fixed tariff's table arguments made
# ahead, so that a request's block of a fixed tariff reads the message and copies these;
# a table that moves with the request is the rater's (rate_args: one pricing
# implementation, in Python).

FREE = 0
FIXED = 1
RATED = 2
ACTIVE_ALWAYS_MS = -(2**63)

cdef int _FREE = 0
cdef int _FIXED = 1
cdef int _RATED = 2
cdef long long _NO_SERVICE = -1
# how a block's Units count a version's units
cdef enum:
    COUNT_TIME = 0
    COUNT_VOLUME = 1
    COUNT_SERVICE_SPECIFIC = 2


cdef class _Version:
    """One tariff version as its block is sent."""
    cdef long long active_from_ms
    cdef int how
    cdef int counted_by
    cdef bint tiered
    cdef str unit_code
    cdef object final_action
    cdef object default_grant_units
    cdef tuple table_args
    cdef object tariff


cdef class _Versions:
    """A (rating group, service id)'s versions, ascending activation; the ids its blocks
    carry, made once."""
    cdef str block_id
    cdef str tariff_id
    cdef list versions

    cdef _Version at(self, long long event_time_ms):
        """The latest version active at the event time (None: none yet)."""
        cdef _Version current = None, version
        for version in self.versions:
            if version.active_from_ms > event_time_ms:
                break
            current = version
        return current


cdef str _block_id_of(object rating_group, long long service_id):
    return str(rating_group) if service_id == _NO_SERVICE else f"{rating_group}.{service_id}"


cdef inline object _units(object units, int counted_by):
    if counted_by == COUNT_TIME:
        return units.time_s
    if counted_by == COUNT_SERVICE_SPECIFIC:
        return units.service_specific_units
    if units.HasField("total_octets"):
        return units.total_octets
    return units.uplink_octets + units.downlink_octets


cdef class BlockPlan:
    """A plan as the kernels read it per request: add_version for each tariff version at
    start, then script_blocks per request."""
    cdef str _plan_name
    cdef object _rate_args
    cdef object _billing_period
    cdef dict _by_group      # rating group -> its versions without a service id
    cdef dict _by_service    # rating group << 32 | service id -> its versions

    def __init__(self, str plan_name, rate_args, billing_period):
        self._plan_name = plan_name
        self._rate_args = rate_args
        self._billing_period = billing_period
        self._by_group = {}
        self._by_service = {}

    def add_version(self, rating_group, service_id, long long active_from_ms, int how,
                    str unit_code, final_action, default_grant_units, bint tiered,
                    table_args, tariff):
        """A version of the tariff of (rating group, service id; -1: none), added in
        ascending active_from_ms; table_args: a FIXED version's rate table arguments."""
        cdef _Versions versions
        cdef _Version version = _Version()
        if not 0 <= rating_group < 2**32 or not -1 <= service_id < 2**32:
            raise ValueError("rating_group, service_id: must be uint32 (service_id -1: none)")
        if how not in (_FREE, _FIXED, _RATED):
            raise ValueError(f"how: FREE, FIXED or RATED, got {how}")
        if unit_code not in ("t", "v", "s"):
            raise ValueError(f"unit_code: one of t, v, s, got {unit_code!r}")
        if (how == _FIXED) != (table_args is not None):
            raise ValueError("table_args: given with FIXED, and only then")
        block_id = _block_id_of(rating_group, service_id)
        if service_id == _NO_SERVICE:
            table, key = self._by_group, rating_group
        else:
            table, key = self._by_service, rating_group << 32 | service_id
        versions = table.get(key)
        if versions is None:
            versions = _Versions()
            versions.block_id, versions.tariff_id = block_id, f"{self._plan_name}/{block_id}"
            versions.versions = []
            table[key] = versions
        # (no negative indexes: wraparound is off)
        count = len(versions.versions)
        if count and (<_Version>versions.versions[count - 1]).active_from_ms > active_from_ms:
            raise ValueError("active_from_ms: versions are added in ascending order")
        version.active_from_ms, version.how, version.tiered = active_from_ms, how, tiered
        version.unit_code = unit_code
        version.counted_by = (COUNT_TIME if unit_code == "t" else
                              COUNT_VOLUME if unit_code == "v" else COUNT_SERVICE_SPECIFIC)
        version.final_action, version.default_grant_units = final_action, default_grant_units
        version.table_args = tuple(table_args or ())
        version.tariff = tariff
        versions.versions.append(version)

    def script_blocks(self, blocks, long long event_time_ms, bint default_grant):
        """The charging script's block arguments: their count, then each block's fields
        (and rate table)."""
        cdef list args = [len(blocks)]
        cdef str period = ""  # the billing period, found once and only for tiers
        cdef long long service_id
        cdef _Versions versions
        cdef _Version version
        for block in blocks:
            rating_group = block.rating_group
            service_id = block.service_id if block.HasField("service_id") else _NO_SERVICE
            versions = None
            version = None
            if service_id != _NO_SERVICE:
                versions = self._by_service.get(
                    (<unsigned long long>rating_group) << 32 | <unsigned long long>service_id)
                if versions is not None:
                    version = versions.at(event_time_ms)
                if version is None:
                    versions = None  # the ids are the request's, the tariff the group's
                    general = self._by_group.get(rating_group)
                    if general is not None:
                        version = (<_Versions>general).at(event_time_ms)
            else:
                versions = self._by_group.get(rating_group)
                if versions is not None:
                    version = versions.at(event_time_ms)
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
            self._add_block(args, block, version, block_id, rating_group, tariff_id,
                            default_grant, event_time_ms, period)
        return args

    cdef int _add_block(self, list args, object block, _Version version, str block_id,
                        object rating_group, str tariff_id, bint default_grant,
                        long long event_time_ms, str period) except -1:
        requested = -1
        if block.HasField("requested"):
            requested = _units(block.requested, version.counted_by)
            if requested == 0 and default_grant and version.how != _FREE:
                requested = version.default_grant_units
        used = _units(block.used, version.counted_by)
        args.append(block_id)
        args.append(rating_group)
        args.append(tariff_id)
        if version.how == _FREE:
            args.append("free")
            args.append(max(requested, 0))
        else:
            args.append("ok")
            args.append(requested)
        args.append(used)
        args.append(version.unit_code)
        args.append(version.final_action)
        if version.how == _FIXED:
            args.extend(version.table_args)
        elif version.how == _RATED:
            # time-unit usage reported now ended now: the table looks back over it
            args.extend(self._rate_args(
                version.tariff, event_time_ms,
                used if version.counted_by == COUNT_TIME else 0, period))
        return 0
