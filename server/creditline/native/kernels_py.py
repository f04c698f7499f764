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
from collections.abc import Sequence

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
