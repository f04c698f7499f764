"""Rating: the kernels (compiled and pure, every test on both), their laws, the schedules
the BandedRater builds (bands, tiers, activation dates) and plan-file validation.

Hypothesis compares the compiled kernels with the pure twin on 10,000 generated
schedules and usages, and checks that both agree with PriceSchedule (rating.py), the
reference the Lua charging script follows.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import random
import tomllib
from array import array
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from creditline.charging import kernels as kernel_selection
from creditline.charging.kernels import Kernels, KernelSchedule, compiled_kernels, pure_kernels
from creditline.charging.rating import (
    BandedRater,
    IncrementRater,
    Plan,
    PriceSchedule,
    Segment,
    Tariff,
    load_plan,
    parse_plan,
)
from creditline.settings import DEFAULT_PLAN_PATH
from creditline.store.contract import MAX_SAFE_INTEGER, MAX_SEGMENTS
from creditline.store.redis_process import RedisProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis as SyncRedis

from tests.test_plan_file import assert_plan_refused

ROOT = Path(__file__).resolve().parent.parent
PARIS = ZoneInfo("Europe/Paris")
KIB, MIB = 1024, 1024 * 1024
IMPLEMENTATIONS = ("compiled", "pure")


def _load(name: str) -> Kernels:
    # The compiled kernels must be there: a build without them fails here, not skips.
    return compiled_kernels() if name == "compiled" else pure_kernels()


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def kernels(request: pytest.FixtureRequest) -> Kernels:
    return _load(request.param)


def unix_ms(year: int, month: int, day: int, hour: int, minute: int, second: int,
            zone: ZoneInfo = PARIS) -> int:
    moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=zone)
    return int(moment.timestamp()) * 1000


def plan_from(text: str, source: str = "test.toml") -> Plan:
    return parse_plan(tomllib.loads(text), source)


# ---------------------------------------------------------------- schedules as data

INCREMENTS = (1, 6, 30, 60, KIB, MIB, 7, 13)


def _schedule(connect_fee_micros: int, aligned: bool,
              bounded: list[tuple[int, int, int, int]],
              last: tuple[int, int, int, int] | None) -> PriceSchedule:
    segments = []
    end = 0
    for increment, count, price, spare in bounded:
        # aligned: ends on increment boundaries, as the rater builds them; otherwise any
        # end (the script and the kernels accept any)
        end += increment * count + (0 if aligned else spare % increment)
        segments.append(Segment(end, increment, price))
    if last is not None:
        segments.append(Segment(None, last[0], last[2]))
    return PriceSchedule(connect_fee_micros, tuple(segments))


# Flat draws (no @composite): generation is most of the cost of 10,000 examples.
# prices mostly small, sometimes up to 2^53 - 1 (the saturating paths)
_prices = st.integers(0, 50_000) | st.integers(0, MAX_SAFE_INTEGER)
_segments = st.tuples(st.sampled_from(INCREMENTS), st.integers(1, 50), _prices,
                      st.integers(0, 99))
schedules = st.builds(
    _schedule, st.integers(0, 1_000_000) | st.integers(0, MAX_SAFE_INTEGER), st.booleans(),
    st.lists(_segments, max_size=6),
    # mostly open-ended; sometimes the price list ends
    st.one_of(_segments, _segments, _segments, st.none()))


usages = st.integers(0, 200_000) | st.integers(0, MAX_SAFE_INTEGER)
amounts = st.integers(0, 10**9) | st.integers(0, MAX_SAFE_INTEGER)


def boundary_at_or_after(schedule: PriceSchedule, units: int) -> int:
    """The first increment boundary at or after `units` (cumulative)."""
    start = 0
    for seg in schedule.segments:
        if seg.end_units is None or units <= seg.end_units:
            rounded = start + -(-(units - start) // seg.increment_units) * seg.increment_units
            return rounded if seg.end_units is None else min(rounded, seg.end_units)
        start = seg.end_units
    return units


def increment_after(schedule: PriceSchedule, units: int) -> int:
    """The increment of the segment holding unit `units + 1` (1 beyond the last segment)."""
    for seg in schedule.segments:
        if seg.end_units is None or units < seg.end_units:
            return seg.increment_units
    return 1


# ---------------------------------------------------------------- kernels: examples

VOICE = PriceSchedule(100_000, (Segment(60, 60, 600_000), Segment(None, 1, 10_000)))


def test_cost_of_the_voice_tariff(kernels: Kernels) -> None:
    voice = kernels.schedule(VOICE)
    assert voice.cost(0, 0) == 0
    assert voice.cost(0, 1) == 700_000        # connect fee + the whole first minute
    assert voice.cost(0, 60) == 700_000
    assert voice.cost(0, 61) == 710_000
    assert voice.cost(60, 1) == 10_000        # no connect fee after the start
    assert voice.cost(30, 40) == 100_000      # rest of the first minute is already paid
    assert voice.cost_to(61) == 710_000


def test_inverse_of_the_voice_tariff(kernels: Kernels) -> None:
    voice = kernels.schedule(VOICE)
    assert voice.affordable(0, 699_999, 10**6) == 0       # not even the first minute
    assert voice.affordable(0, 700_000, 10**6) == 60
    assert voice.affordable(0, 719_999, 10**6) == 61
    assert voice.affordable(0, 10**9, 300) == 300         # capped by what is wanted
    assert voice.affordable(30, 0, 100) == 30             # the paid minute's remainder
    assert voice.max_units_within(699_999) == 0


def test_free_rest_and_an_ending_price_list(kernels: Kernels) -> None:
    free_after = kernels.schedule(PriceSchedule(0, (Segment(10, 1, 5), Segment(None, 1, 0))))
    assert free_after.affordable(0, 50, MAX_SAFE_INTEGER) == MAX_SAFE_INTEGER
    assert free_after.max_units_within(50) == kernels.module.REACH_UNBOUNDED
    ending = kernels.schedule(PriceSchedule(0, (Segment(10, 1, 5),)))
    assert ending.cost(0, 11) == MAX_SAFE_INTEGER  # units beyond the list: unaffordable
    assert ending.affordable(0, 10**9, 100) == 10


def test_costs_saturate_at_the_largest_safe_integer(kernels: Kernels) -> None:
    dear = kernels.schedule(PriceSchedule(5, (Segment(None, 1, MAX_SAFE_INTEGER // 3),)))
    assert dear.cost(0, 2) == 5 + 2 * (MAX_SAFE_INTEGER // 3)
    assert dear.cost(0, 3) == MAX_SAFE_INTEGER
    assert dear.cost(0, MAX_SAFE_INTEGER) == MAX_SAFE_INTEGER
    assert dear.affordable(0, MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) == 2


@pytest.mark.parametrize(("args", "error"), [
    ((0, [10, 5], [1, 1], [1, 1]), ValueError),       # ends must rise
    ((0, [-1, 5], [1, 1], [1, 1]), ValueError),       # only the last may have no end
    ((0, [-1], [0], [1]), ValueError),                # increment of 0
    ((0, [-1], [1], [-1]), ValueError),               # negative price
    ((2**53, [-1], [1], [1]), ValueError),            # above 2^53 - 1
    ((2**70, [-1], [1], [1]), ValueError),            # above int64 too
    ((0, [-1], [1], [1.5]), TypeError),               # money is never a float
    ((0, [-1], [1, 2], [1]), ValueError),             # lengths differ
    ((0, [-1] * 65, [1] * 65, [1] * 65), ValueError),  # beyond MAX_SEGMENTS
])
def test_bad_schedules_are_refused_alike(kernels: Kernels, args: tuple[object, ...],
                                         error: type[Exception]) -> None:
    with pytest.raises(error):
        kernels.module.Schedule(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(("call", "error"), [
    (lambda s: s.cost(-1, 1), ValueError),
    (lambda s: s.cost(0, 2**53), ValueError),
    (lambda s: s.cost(0, 2**64), ValueError),
    (lambda s: s.affordable(0, 1.0, 1), TypeError),
    (lambda s: s.max_units_within(-5), ValueError),
])
def test_bad_arguments_are_refused_alike(kernels: Kernels,
                                         call: Callable[[KernelSchedule], object],
                                         error: type[Exception]) -> None:
    with pytest.raises(error):
        call(kernels.schedule(VOICE))


def test_batches_give_what_single_calls_give(kernels: Kernels) -> None:
    tiered = PriceSchedule(0, (Segment(KIB, KIB, 1_000), Segment(MIB, KIB, 1_000),
                               Segment(None, KIB, 500)))
    table = [kernels.schedule(VOICE), kernels.schedule(tiered)]
    index = array("q", [0, 1, 1, 0, 1])
    starts = array("q", [0, 0, MIB - KIB, 30, 5])
    units = array("q", [61, 2 * MIB, 2 * KIB, 40, 0])
    costs = kernels.module.cost_batch(table, index, starts, units)
    assert list(costs) == [table[i].cost(f, u) for i, f, u in zip(index, starts, units,
                                                                 strict=True)]
    wanted = array("q", [10**6] * 5)
    money = array("q", [700_000, 10**6, 1_500, 0, 0])
    grants = kernels.module.affordable_batch(table, index, starts, money, wanted)
    assert list(grants) == [table[i].affordable(f, a, w) for i, f, a, w in
                            zip(index, starts, money, wanted, strict=True)]
    with pytest.raises(IndexError):
        kernels.module.cost_batch(table, array("q", [2]), array("q", [0]), array("q", [1]))


# ---------------------------------------------------------------- compiled == pure

COMPILED, PURE = _load("compiled"), _load("pure")
REACH_UNBOUNDED = PURE.module.REACH_UNBOUNDED


# It compares both implementations itself: once per suite is enough, in the run on the
# compiled kernels (the README's test command runs the suite again on the pure twin).
@pytest.mark.skipif(os.environ.get(kernel_selection.PURE_ENV) == "1",
                    reason="compares both implementations: runs in the compiled run")
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules, usages, usages, amounts, usages, st.integers(0, 100_000))
def test_compiled_and_pure_give_identical_results(
        schedule: PriceSchedule, start: int, units: int, amount: int, wanted: int,
        more: int) -> None:
    compiled, pure = COMPILED.schedule(schedule), PURE.schedule(schedule)
    cost = compiled.cost(start, units)
    assert cost == pure.cost(start, units)
    assert compiled.cost_to(units) == pure.cost_to(units)
    granted = compiled.affordable(start, amount, wanted)
    assert granted == pure.affordable(start, amount, wanted)
    assert compiled.max_units_within(amount) == pure.max_units_within(amount)
    # the laws below, on the same 10,000 examples (identical results: they hold for both)
    if units + more <= MAX_SAFE_INTEGER:
        assert cost <= compiled.cost(start, units + more)
    check_the_inverse(compiled, schedule, start, amount, wanted, granted)


def check_the_inverse(kernel: KernelSchedule, schedule: PriceSchedule, start: int,
                      amount: int, wanted: int, granted: int) -> None:
    """cost(inverse(A)) <= A < cost(inverse(A) + one increment), grants in whole
    increments. Costs saturate at MAX_SAFE_INTEGER: the upper bound holds while the
    budget is below it, and only from points inside the price list (beyond it every cost
    is the saturated value and differences say nothing)."""
    base = kernel.cost_to(start)
    if base >= MAX_SAFE_INTEGER:
        return
    assert 0 <= granted <= wanted
    assert kernel.cost(start, granted) <= amount
    reach = kernel.max_units_within(base + amount)
    if granted < wanted and reach < REACH_UNBOUNDED and base + amount < MAX_SAFE_INTEGER:
        # grants end on an increment boundary (whole increments) ...
        assert boundary_at_or_after(schedule, start + granted) == start + granted
        # ... and A < cost(inverse(A) + one increment)
        one_more = increment_after(schedule, start + granted)
        if start + granted + one_more <= MAX_SAFE_INTEGER:
            assert amount < kernel.cost(start, granted + one_more)


def test_compiled_and_pure_batches_are_identical() -> None:
    rng_schedules = [VOICE, PriceSchedule(0, (Segment(KIB, KIB, 1_000),
                                              Segment(MIB, KIB, 1_000),
                                              Segment(None, KIB, 500)))]
    index = array("q", [i % 2 for i in range(1_000)])
    starts = array("q", [(i * 7919) % (2 * MIB) for i in range(1_000)])
    units = array("q", [(i * 104729) % (3 * MIB) for i in range(1_000)])
    results = [k.module.cost_batch([k.schedule(s) for s in rng_schedules], index, starts, units)
               for k in (COMPILED, PURE)]
    assert results[0] == results[1]


# ---------------------------------------------------------------- the reference agrees

@settings(max_examples=500, deadline=None)
@given(schedules, st.integers(0, 500_000), st.integers(0, 500_000), amounts,
       st.integers(0, 10**12))
def test_the_price_schedule_prices_as_the_reference_twin(
        schedule: PriceSchedule, start: int, units: int, amount: int, wanted: int) -> None:
    # PriceSchedule prices with the kernels the environment chose (compiled unless
    # CREDITLINE_PURE_RATING=1); the pure twin is the reference
    reference = PURE.schedule(schedule)
    assert schedule.cost(start + units) - schedule.cost(start) == reference.cost(start, units)
    assert schedule.affordable_units(start, amount, wanted) == reference.affordable(
        start, amount, wanted)
    reach = schedule.max_units_within(amount)
    assert min(reach, REACH_UNBOUNDED) == reference.max_units_within(amount)


# ---------------------------------------------------------------- laws

@settings(max_examples=500, deadline=None)
@given(schedules, st.integers(0, 500_000), st.integers(0, 500_000),
       st.integers(0, 500_000))
def test_cost_is_monotonic_in_usage(kernels: Kernels, schedule: PriceSchedule, start: int,
                                    a: int, b: int) -> None:
    kernel = kernels.schedule(schedule)
    low, high = sorted((a, b))
    assert kernel.cost(start, low) <= kernel.cost(start, high)


@settings(max_examples=500, deadline=None)
@given(schedules, st.integers(1, 500_000))
def test_usage_is_charged_in_whole_increments(kernels: Kernels, schedule: PriceSchedule,
                                               units: int) -> None:
    kernel = kernels.schedule(schedule)
    # a started increment costs what the whole increment costs
    assert kernel.cost_to(units) == kernel.cost_to(boundary_at_or_after(schedule, units))


@settings(max_examples=500, deadline=None)
@given(schedules, st.integers(0, 500_000), st.integers(0, 10**10), st.integers(0, 10**9))
def test_the_inverse_never_promises_what_the_amount_cannot_pay(
        kernels: Kernels, schedule: PriceSchedule, start: int, amount: int,
        wanted: int) -> None:
    kernel = kernels.schedule(schedule)
    granted = kernel.affordable(start, amount, wanted)
    check_the_inverse(kernel, schedule, start, amount, wanted, granted)


# ---------------------------------------------------------------- bands

BANDED_PLAN = """
[plan]
time_zone = "Europe/Paris"

[[tariff]]
rating_group = 100
unit = "time"
connect_fee_micros = 100
first_increment_units = 60
first_increment_price_micros = 600
next_increment_units = 60
next_increment_price_micros = 600

[[tariff.band]]
name = "peak"
days = ["mon", "tue", "wed", "thu", "fri"]
start = "08:00"
end = "20:00"
first_increment_price_micros = 900
next_increment_price_micros = 900

[[tariff]]
rating_group = 101
unit = "time"
first_increment_units = 1
first_increment_price_micros = 20
next_increment_units = 1
next_increment_price_micros = 10

[[tariff.band]]
name = "peak"
start = "08:00"
end = "20:00"
next_increment_price_micros = 30

[[tariff]]
rating_group = 10
unit = "volume"
first_increment_units = 1024
first_increment_price_micros = 1000
next_increment_units = 1024
next_increment_price_micros = 1000

[[tariff.band]]
name = "night"
start = "00:00"
end = "06:00"
next_increment_price_micros = 100

[[tariff.tier]]
from_units = 1048576
next_increment_price_micros = 500
band_prices_micros = { night = 50 }
"""


@pytest.fixture(scope="module")
def banded_plan() -> Plan:
    return plan_from(BANDED_PLAN)


def tariff(plan: Plan, rating_group: int) -> Tariff:
    found = plan.tariff_for(rating_group, None)
    assert isinstance(found, Tariff)
    return found


def priced(kernels: Kernels, plan: Plan, rating_group: int, event_ms: int,
           period_used_units: int = 0) -> KernelSchedule:
    schedule = BandedRater().schedule(tariff(plan, rating_group), event_ms, period_used_units)
    return kernels.schedule(schedule)


def test_a_call_across_the_end_of_peak_is_split(kernels: Kernels, banded_plan: Plan) -> None:
    monday_evening = unix_ms(2026, 11, 30, 19, 59, 30)
    voice = priced(kernels, banded_plan, 100, monday_evening)
    # the first minute starts in peak (900); the second starts at 20:00:30, off-peak (600)
    assert voice.cost(0, 120) == 100 + 900 + 600
    per_second = priced(kernels, banded_plan, 101, monday_evening)
    # 30 s in peak (first second 20, then 29 at 30), 30 s off-peak at 10
    assert per_second.cost(0, 60) == 20 + 29 * 30 + 30 * 10


def test_a_call_into_peak_is_split(kernels: Kernels, banded_plan: Plan) -> None:
    monday_morning = unix_ms(2026, 11, 30, 7, 59, 30)
    voice = priced(kernels, banded_plan, 100, monday_morning)
    # an increment is priced by the band it starts in: 07:59:30 and 08:00:30 start minutes
    assert voice.cost(0, 60) == 100 + 600
    assert voice.cost(0, 120) == 100 + 600 + 900
    # the inverse across the boundary: 1600 buys the off-peak minute and one peak minute
    assert voice.affordable(0, 1_600, 10**6) == 120
    assert voice.affordable(0, 1_599, 10**6) == 60


def test_weekend_is_off_peak(kernels: Kernels, banded_plan: Plan) -> None:
    saturday_noon = unix_ms(2026, 12, 5, 12, 0, 0)
    voice = priced(kernels, banded_plan, 100, saturday_noon)
    assert voice.cost(0, 600) == 100 + 10 * 600


def test_band_changes_follow_the_time_zone_across_daylight_saving(
        kernels: Kernels, banded_plan: Plan) -> None:
    # 2026-03-29 in Paris: 02:00 CET becomes 03:00 CEST; from 01:30 to the 08:00 peak is
    # 5.5 hours of real time. Sunday: band 101's peak applies every day.
    early_sunday = unix_ms(2026, 3, 29, 1, 30, 0)
    schedule = BandedRater().schedule(tariff(banded_plan, 101), early_sunday)
    assert schedule.segments[1].end_units == 5 * 3600 + 1800
    assert schedule.segments[1].increment_price_micros == 10
    assert schedule.segments[2].increment_price_micros == 30
    per_second = kernels.schedule(schedule)
    assert per_second.cost(19_800 - 1, 2) == 10 + 30


def test_volume_takes_the_band_of_the_event_time(kernels: Kernels,
                                                 banded_plan: Plan) -> None:
    night = priced(kernels, banded_plan, 10, unix_ms(2026, 12, 1, 3, 0, 0))
    day = priced(kernels, banded_plan, 10, unix_ms(2026, 12, 1, 12, 0, 0))
    assert night.cost(0, 3 * KIB) == 1000 + 2 * 100
    assert day.cost(0, 3 * KIB) == 3 * 1000


# ---------------------------------------------------------------- tiers

def test_a_usage_across_a_tier_is_split(kernels: Kernels, banded_plan: Plan) -> None:
    day = unix_ms(2026, 12, 1, 12, 0, 0)
    web = priced(kernels, banded_plan, 10, day)
    assert web.cost(0, MIB) == 1024 * 1000
    assert web.cost(0, 2 * MIB) == 1024 * 1000 + 1024 * 500
    assert web.cost(MIB - KIB, 2 * KIB) == 1000 + 500
    # inverse across the tier: 1500 from 1 KiB before the tier buys both KiB
    assert web.affordable(MIB - KIB, 1_500, 10**9) == 2 * KIB
    assert web.affordable(MIB - KIB, 1_499, 10**9) == KIB


def test_tiers_count_the_usage_already_in_the_billing_period(
        kernels: Kernels, banded_plan: Plan) -> None:
    day = unix_ms(2026, 12, 1, 12, 0, 0)
    web = priced(kernels, banded_plan, 10, day, period_used_units=MIB - 4 * KIB)
    # first increment at its own price, 3 more at 1000, then the tier's 500
    assert web.cost(0, 8 * KIB) == 1000 + 3 * 1000 + 4 * 500
    night = priced(kernels, banded_plan, 10, unix_ms(2026, 12, 1, 3, 0, 0),
                   period_used_units=2 * MIB)
    assert night.cost(0, 3 * KIB) == 1000 + 2 * 50  # the tier's night price


# ---------------------------------------------------------------- rater-built schedules

ZONES = ("UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe")


@st.composite
def banded_tariffs(draw: st.DrawFn) -> Tariff:
    first = draw(st.sampled_from([1, 6, 30, 60]))
    following = draw(st.sampled_from([1, 6, 60]))
    lines = [
        "[plan]", f'time_zone = "{draw(st.sampled_from(ZONES))}"',
        "[[tariff]]", "rating_group = 1",
        f'unit = "{draw(st.sampled_from(["time", "volume"]))}"',
        f"connect_fee_micros = {draw(st.integers(0, 1000))}",
        f"first_increment_units = {first}",
        f"first_increment_price_micros = {draw(st.integers(0, 5000))}",
        f"next_increment_units = {following}",
        f"next_increment_price_micros = {draw(st.integers(0, 5000))}",
    ]
    hours = sorted(draw(st.lists(st.integers(0, 24), min_size=0, max_size=6, unique=True)))
    for number, (start, end) in enumerate(zip(hours[::2], hours[1::2], strict=False)):
        lines += ["[[tariff.band]]", f'name = "b{number}"', f'start = "{start:02d}:00"',
                  f'end = "{end:02d}:00"',
                  f"next_increment_price_micros = {draw(st.integers(0, 5000))}"]
    from_units = first
    for _ in range(draw(st.integers(0, 3))):
        from_units += following * draw(st.integers(1, 5000))
        lines += ["[[tariff.tier]]", f"from_units = {from_units}",
                  f"next_increment_price_micros = {draw(st.integers(0, 5000))}"]
    return tariff(plan_from("\n".join(lines)), 1)


@settings(max_examples=300, deadline=None)
@given(banded_tariffs(), st.integers(1_700_000_000_000, 1_900_000_000_000),
       st.integers(0, 100_000), st.integers(0, 1_000_000), st.integers(0, 10**7))
def test_rater_schedules_are_aligned_and_priced_alike(
        kernels: Kernels, tariff_: Tariff, event_ms: int, period_used: int, units: int,
        amount: int) -> None:
    schedule = BandedRater().schedule(tariff_, event_ms, period_used)
    assert len(schedule.segments) <= MAX_SEGMENTS
    start = 0
    for seg in schedule.segments:
        if seg.end_units is not None:  # every end on an increment boundary: none is split
            assert (seg.end_units - start) % seg.increment_units == 0
            start = seg.end_units
    kernel = kernels.schedule(schedule)
    assert kernel.cost(0, units) == schedule.cost(units)
    assert kernel.affordable(0, amount, 10**9) == schedule.affordable_units(0, amount, 10**9)


def test_the_shipped_plan_rates_as_before() -> None:
    plan = load_plan(DEFAULT_PLAN_PATH)
    for key, found in plan.tariffs.items():
        assert BandedRater().schedule(found, 0) == IncrementRater().schedule(found, 0), key
    free = plan.tariff_for(900, None)
    assert free is not None and free.free  # answered 4011, no credit control


# ---------------------------------------------------------------- the charging script agrees

LUA_RATING_HARNESS = """
local MAX_SAFE = 9007199254740991
%s
-- ARGV: connect fee, segment count, (end, increment, price) per segment, then queries of
-- (from, units, amount, wanted); returns "cost,affordable" per query
-- (the script's schedule form: { connect fee, end, increment, price, end, ... })
local block = { tonumber(ARGV[1]) }
local i = 3
for s = 1, tonumber(ARGV[2]) do
  local ending = tonumber(ARGV[i])
  if ending < 0 then ending = math.huge end
  block[#block + 1], block[#block + 2] = ending, tonumber(ARGV[i + 1])
  block[#block + 1] = tonumber(ARGV[i + 2])
  i = i + 3
end
local out = {}
while i <= #ARGV do
  local from, units = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local amount, wanted = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  out[#out + 1] = string.format('%%d,%%d', cost(block, from + units) - cost(block, from),
    affordable_units(block, from, amount, wanted))
  i = i + 4
end
return out
"""


def harness_args(schedule: PriceSchedule) -> list[int]:
    """A schedule as LUA_RATING_HARNESS reads it."""
    args: list[int] = [schedule.connect_fee_micros, len(schedule.segments)]
    for seg in schedule.segments:
        end = -1 if seg.end_units is None else seg.end_units
        args += [end, seg.increment_units, seg.increment_price_micros]
    return args


def lua_rating_functions() -> str:
    """The rating functions of the charging script, as they are (its parts, not a copy), and
    the standard functions they call bound."""
    charge = resources.files("creditline.store").joinpath("lua", "charge")
    return "".join(charge.joinpath(f"{part}.lua").read_text(encoding="utf-8")
                   for part in ("libraries", "rating")) + "bind_libraries()\n"


def test_the_charging_script_prices_rater_schedules_as_the_kernels_do(
        redis_process: RedisProcess, kernels: Kernels, banded_plan: Plan) -> None:
    rng = random.Random(20261129)
    client = SyncRedis.from_url(redis_process.url, decode_responses=True)
    harness = LUA_RATING_HARNESS % lua_rating_functions()
    try:
        for rating_group in (100, 101, 10):
            event_ms = unix_ms(2026, 11, 30, 0, 0, 0) + rng.randrange(7 * 86_400_000)
            schedule = BandedRater().schedule(tariff(banded_plan, rating_group), event_ms,
                                              rng.choice([0, MIB - 8 * KIB, 3 * MIB]))
            kernel = kernels.schedule(schedule)
            queries = [(rng.randrange(200_000), rng.randrange(200_000),
                        rng.randrange(10**8), rng.randrange(10**6)) for _ in range(300)]
            flat = [value for query in queries for value in query]
            answers = client.eval(harness, 0, *harness_args(schedule), *flat)
            expected = [f"{kernel.cost(f, u)},{kernel.affordable(f, a, w)}"
                        for f, u, a, w in queries]
            assert answers == expected, schedule
    finally:
        client.close()


GOOD_TARIFF_TEXT = """
[[tariff]]
rating_group = 1
unit = "service_specific"
next_increment_price_micros = 5
"""

LUA_RATE_TABLE_HARNESS = """
local MAX_SAFE = 9007199254740991
%s
-- ARGV: a rate table, then rated units, period units, offset s, then queries of
-- (units, amount, wanted) from the rated units; returns "cost,affordable" per query
local block = {}
local i = read_rate_table(block, 1)
local rated, period_units, offset_s = tonumber(ARGV[i]), tonumber(ARGV[i + 1]),
  tonumber(ARGV[i + 2])
i = i + 3
local schedule = schedule_from(block, rated, period_units, offset_s)
local out = {}
while i <= #ARGV do
  local units, amount, wanted = tonumber(ARGV[i]), tonumber(ARGV[i + 1]),
    tonumber(ARGV[i + 2])
  i = i + 3
  out[#out + 1] = string.format('%%d,%%d',
    cost(schedule, rated + units) - cost(schedule, rated),
    affordable_units(schedule, rated, amount, wanted))
end
return out
"""


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(banded_tariffs(), st.integers(1_700_000_000_000, 1_900_000_000_000),
       st.integers(0, 200_000), st.integers(0, 200_000), st.integers(0, 30_000),
       st.integers(0, 3 * 86_400), st.randoms(use_true_random=False))
def test_the_charging_script_builds_schedules_as_the_rate_table_does(
        redis_process: RedisProcess, tariff_: Tariff, event_ms: int, rated: int,
        period_units: int, reported_s: int, lookback_s: int, rng: random.Random) -> None:
    """From any point of a session (units rated, billing-period usage, seconds before the
    event time) the script's schedule prices and grants as RateTable.schedule."""
    table = BandedRater().rate_table(tariff_, event_ms, lookback_s, "2026-11-01")
    offset_s = -min(reported_s, lookback_s)
    schedule = table.schedule(rated, period_units, offset_s)
    queries = [(rng.randrange(300_000), rng.randrange(10**8), rng.randrange(10**6))
               for _ in range(20)]
    client = SyncRedis.from_url(redis_process.url, decode_responses=True)
    try:
        answers = client.eval(LUA_RATE_TABLE_HARNESS % lua_rating_functions(), 0,
                              *table.script_args, rated, period_units, offset_s,
                              *[value for query in queries for value in query])
    finally:
        client.close()
    expected = [f"{schedule.cost(rated + u) - schedule.cost(rated)},"
                f"{schedule.affordable_units(rated, a, w)}" for u, a, w in queries]
    assert answers == expected


def test_reported_usage_is_priced_by_the_bands_it_was_used_in(banded_plan: Plan) -> None:
    # per second: 30 in peak (08:00-20:00), 10 off-peak (the first second: 20)
    per_second = tariff(banded_plan, 101)
    update_at = unix_ms(2026, 11, 30, 20, 1, 0)
    table = BandedRater().rate_table(per_second, update_at, 120, "")
    # 120 s reported at 20:01:00 after 60 s already rated: 60 s of peak, 60 off-peak
    schedule = table.schedule(60, 0, -120)
    assert schedule.cost(180) - schedule.cost(60) == 60 * 30 + 60 * 10
    # what is granted at 20:01:00 is off-peak
    grant = table.schedule(180, 0, 0)
    assert grant.cost(240) - grant.cost(180) == 60 * 10


def test_tiers_count_from_where_the_billing_period_stands(banded_plan: Plan) -> None:
    web = tariff(banded_plan, 10)
    table = BandedRater().rate_table(web, unix_ms(2026, 12, 1, 12, 0, 0), 0, "2026-12-01")
    # a session 10 KiB in, the period 4 KiB short of the 1 MiB tier: 4 KiB at 1000, then 500
    schedule = table.schedule(10 * KIB, MIB - 4 * KIB, 0)
    assert schedule.cost(18 * KIB) - schedule.cost(10 * KIB) == 4 * 1000 + 4 * 500


@pytest.mark.parametrize(("billing_day", "moment", "period"), [
    (1, (2026, 11, 30, 23, 59, 59), "2026-11-01"),
    (1, (2026, 12, 1, 0, 0, 0), "2026-12-01"),
    (15, (2026, 12, 14, 23, 0, 0), "2026-11-15"),
    (15, (2027, 1, 3, 0, 0, 0), "2026-12-15"),
])
def test_the_billing_period_starts_on_the_billing_day_in_the_plan_time_zone(
        billing_day: int, moment: tuple[int, int, int, int, int, int], period: str) -> None:
    plan = plan_from(f'[plan]\ntime_zone = "Europe/Paris"\nbilling_day = {billing_day}\n'
                     + GOOD_TARIFF_TEXT)
    assert plan.billing_period(unix_ms(*moment, zone=PARIS)) == period


def test_the_example_plan_loads_and_rates(kernels: Kernels) -> None:
    plan = load_plan(DEFAULT_PLAN_PATH.parent / "bands-and-tiers.toml")
    monday_evening = unix_ms(2026, 11, 30, 19, 59, 0)
    voice = plan.tariff_for(100, None, monday_evening)
    assert voice is not None and voice.first_increment_units == 60
    schedule = kernels.schedule(BandedRater().schedule(voice, monday_evening))
    assert schedule.cost(0, 120) == 100_000 + 450_000 + 300_000
    later = plan.tariff_for(100, None, unix_ms(2027, 1, 1, 0, 0, 0))
    assert later is not None and later.next_increment_units == 6


# ---------------------------------------------------------------- activation dates

VERSIONED_PLAN = """
[plan]
time_zone = "Europe/Paris"

[[tariff]]
rating_group = 300
unit = "service_specific"
next_increment_price_micros = 50

[[tariff]]
rating_group = 300
unit = "service_specific"
active_from = 2027-01-01
next_increment_price_micros = 40

[[tariff]]
rating_group = 300
service_id = 7
unit = "service_specific"
active_from = 2027-06-01T12:00:00Z
next_increment_price_micros = 1
"""


def test_a_tariff_is_used_from_its_activation_date() -> None:
    plan = plan_from(VERSIONED_PLAN)
    new_year = unix_ms(2027, 1, 1, 0, 0, 0)   # midnight in the plan's time zone
    assert tariff_price(plan, 300, None, new_year - 1) == 50
    assert tariff_price(plan, 300, None, new_year) == 40
    # the service's own tariff only once active; before, the rating group's
    june = unix_ms(2027, 6, 1, 12, 0, 0, zone=ZoneInfo("UTC"))
    assert tariff_price(plan, 300, 7, june - 1) == 40
    assert tariff_price(plan, 300, 7, june) == 1
    assert len(plan.tariffs) == 2


def tariff_price(plan: Plan, rating_group: int, service_id: int | None, at_ms: int) -> int:
    found = plan.tariff_for(rating_group, service_id, at_ms)
    assert found is not None
    price: int = found.next_increment_price_micros
    return price


def test_no_tariff_before_the_first_activation() -> None:
    plan = plan_from(VERSIONED_PLAN.replace("next_increment_price_micros = 50",
                                            "next_increment_price_micros = 50\n"
                                            "active_from = 2026-12-01"))
    assert plan.tariff_for(300, None, unix_ms(2026, 11, 30, 0, 0, 0)) is None


# ---------------------------------------------------------------- plan validation

GOOD = """
[[tariff]]
rating_group = 1
unit = "time"
first_increment_units = 30
next_increment_units = 6
next_increment_price_micros = 1
"""
BAND = '\n[[tariff.band]]\nname = "peak"\nstart = "08:00"\nend = "20:00"\n'


@pytest.mark.parametrize(("text", "field", "reason"), [
    ("[plan]\ntime_zone = 'Mars/Olympus'\n" + GOOD, "plan.time_zone", "not a known time zone"),
    (GOOD + BAND, "tariff[0].band[0].next_increment_price_micros", "required"),
    (GOOD + BAND.replace("08:00", "8h") + "next_increment_price_micros = 1\n",
     "tariff[0].band[0].start", "HH:MM"),
    (GOOD + BAND.replace("20:00", "07:00") + "next_increment_price_micros = 1\n",
     "tariff[0].band[0].end", "after start"),
    (GOOD + BAND + "days = ['lun']\nnext_increment_price_micros = 1\n",
     "tariff[0].band[0].days", "mon"),
    (GOOD + BAND + "next_increment_price_micros = 1\n" + BAND.replace("peak", "p2")
     + "next_increment_price_micros = 1\n", "tariff[0].band[1]", "overlaps band 'peak'"),
    (GOOD + BAND + "next_increment_price_micros = 1\nprice = 3\n",
     "tariff[0].band[0].price", "unknown field"),
    (GOOD + "[[tariff.tier]]\nfrom_units = 40\nnext_increment_price_micros = 1\n",
     "tariff[0].tier[0].from_units", "whole number of next_increment_units"),
    (GOOD + "[[tariff.tier]]\nfrom_units = 42\nnext_increment_price_micros = 1\n"
     "[[tariff.tier]]\nfrom_units = 36\nnext_increment_price_micros = 1\n",
     "tariff[1].tier[1].from_units".replace("[1].tier", "[0].tier"), "above the previous"),
    (GOOD + "[[tariff.tier]]\nfrom_units = 36\nnext_increment_price_micros = 1\n"
     "band_prices_micros = { peak = 1 }\n", "tariff[0].tier[0].band_prices_micros.peak",
     "no band"),
    (GOOD + "active_from = 'soon'\n", "tariff[0].active_from", "date"),
    (GOOD + GOOD, "tariff[1]", "defined twice"),
    (GOOD + "active_from = 2027-01-01\n" + GOOD + "active_from = 2027-01-01\n", "tariff[1]",
     "defined twice"),
])
def test_bad_plans_name_file_field_and_reason(tmp_path: Path, text: str, field: str,
                                              reason: str) -> None:
    assert_plan_refused(tmp_path / "plan.toml", text, field, reason)


# ---------------------------------------------------------------- choosing the kernels

def build_without_compiled_kernels() -> Kernels:
    """What loading the compiled kernels does in a build that did not make them."""
    importlib.import_module("creditline.native.absent")
    raise AssertionError("creditline.native.absent exists")


def test_compiled_kernels_are_the_default() -> None:
    assert kernel_selection.rating_implementation({}) == "compiled"
    assert kernel_selection.require_kernels({}).implementation == "compiled"


def test_the_environment_forces_the_pure_path() -> None:
    environ = {kernel_selection.PURE_ENV: "1"}
    assert kernel_selection.rating_implementation(environ) == "pure"
    assert kernel_selection.require_kernels(environ).implementation == "pure"


def test_missing_compiled_kernels_are_refused_unless_allowed() -> None:
    absent = build_without_compiled_kernels
    assert kernel_selection.rating_implementation({}, absent) == "pure"
    with pytest.raises(kernel_selection.KernelsUnavailableError, match="ALLOW_PURE_RATING"):
        kernel_selection.require_kernels({}, absent)
    allowed = {kernel_selection.ALLOW_PURE_ENV: "1"}
    assert kernel_selection.require_kernels(allowed, absent).implementation == "pure"
