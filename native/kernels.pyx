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
