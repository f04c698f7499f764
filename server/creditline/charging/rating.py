"""Tariffs, the plan file that holds them, and the rate table the charging script prices with.

A tariff prices one rating group (optionally narrowed by a service id): a connect fee, a
first increment and the following increments, each with its price in micro-units. Usage
is rounded up to whole increments; that is the one rounding rule.

Rating is behind one small interface, `Rater`: it turns the tariff that applies to a
request into a `RateTable`: the increments, the price of each band in each tier, when the
bands change around the event time and where the tiers start in the billing period. Where
a session stands (units already rated, usage of the billing period) lives in Redis, so
the charging script (store/lua/charge/) turns the table into a `PriceSchedule` there,
atomically with the balance: a piecewise-linear price list of segments that it walks for
costs and grants. `RateTable.schedule` and `PriceSchedule.cost / max_units_within` here
are the reference for the Lua functions of the same names; the tests check that they
agree. PriceSchedule prices with the rating kernels (native/).

Every segment end falls on an increment boundary of the session, so an increment is never
split: an increment that starts in a band (or tier) is priced by that band (or tier) whole.
Time-unit usage is placed on the clock by the request: the units an Update reports ended
at its event time, the units it is granted start there.
"""

from __future__ import annotations

import bisect
import datetime as dt
import enum
import math
import struct
import time
import tomllib
import zoneinfo
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from creditline.charging.kernels import KernelSchedule, select_kernels
from creditline.errors import PlanError
from creditline.store.contract import (
    FIXED_SCHEDULE_NUMBER,
    MAX_SAFE_INTEGER,
    MAX_SEGMENTS,
    RateTableForm,
)

# MAX_SAFE_INTEGER (Lua numbers are doubles: every unit count and amount stays below 2^53)
# and MAX_SEGMENTS (segments in one schedule: bounds the charging script's walk and the
# kernels' fixed C arrays) are the contract's, shared with charge.lua and native/.
# How far ahead band changes are looked for: a time-unit schedule covers a week of usage
# from the event time; beyond it (or beyond MAX_SEGMENTS) the last band's price goes on.
BAND_HORIZON_S = 7 * 24 * 3600
# How far back: reported usage ended at the event time, so a report of N seconds started N
# seconds before it. Usage reported for longer than this is priced, before the look-back,
# at the band in force at its start.
BAND_LOOKBACK_S = 7 * 24 * 3600
# Band changes in one rate table (bounds the script's arguments): at most this many in the
# look-back, the rest ahead; beyond them the last band found goes on.
MAX_BAND_CHANGES = 64
MAX_BAND_CHANGES_BEHIND = 16
# The band changes of a tariff are found for the look-back and the horizon plus this much
# on each side, and reused while a request's window stays inside.
TIMELINE_SLACK_S = 7 * 24 * 3600
MAX_KEPT_TARIFFS = 1024  # tariffs the rater keeps tables of: more than any plan has
# The billing period (tiers count usage within it) starts on this day of the month, at
# midnight in the plan's time zone; 28 at most, so that every month has it.
MAX_BILLING_DAY = 28
MAX_BANDS_PER_TARIFF = 16
MAX_TIERS_PER_TARIFF = 16
MINUTES_PER_DAY = 24 * 60
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
# What prices a PriceSchedule: chosen once, as the server chooses (creditline serve refuses
# to start on a silent fall-back to the twin; this module only prices).
_PRICING = select_kernels()


class UnitKind(enum.Enum):
    TIME = "time"                          # seconds
    VOLUME = "volume"                      # total octets
    SERVICE_SPECIFIC = "service_specific"  # messages, API calls...


class FinalAction(enum.Enum):
    TERMINATE = "terminate"
    REDIRECT = "redirect"
    RESTRICT_ACCESS = "restrict_access"


@dataclass(frozen=True, slots=True)
class Segment:
    """Units up to `end_units` (cumulative; None: no end) cost `increment_price_micros`
    per started increment of `increment_units`."""

    end_units: int | None
    increment_units: int
    increment_price_micros: int


@dataclass(frozen=True, slots=True)
class PriceSchedule:
    """A connect fee and its segments, priced by the rating kernels (native/): the one
    pricing implementation on the Python side, the compiled kernels or their pure twin
    as CREDITLINE_PURE_RATING says (the twin is the reference: tests/test_rating.py).
    Unit counts and amounts are below 2^53, as everywhere in the charging path; the
    kernels refuse others (ValueError)."""

    connect_fee_micros: int
    segments: tuple[Segment, ...]
    _kernel: KernelSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_kernel", _PRICING.schedule(self))

    def cost(self, units: int) -> int:
        """Price of the first `units` units (connect fee once, increments rounded up)."""
        return self._kernel.cost_to(units) if units > 0 else 0

    def max_units_within(self, budget_micros: int) -> float:
        """The largest unit count at an increment boundary whose cost is within budget
        (math.inf when the rest is free, or beyond any unit count a request carries)."""
        reach = self._kernel.max_units_within(max(0, budget_micros))
        return math.inf if reach >= _PRICING.module.REACH_UNBOUNDED else reach

    def affordable_units(self, from_units: int, amount_micros: int, wanted_units: int) -> int:
        """Units beyond `from_units` (at most `wanted_units`) that the amount pays for."""
        return self._kernel.affordable(from_units, max(0, amount_micros), wanted_units)


NO_PERIOD = "-"  # the period of a rate table whose tariff has no tiers


@dataclass(frozen=True, slots=True)
class RateTable:
    """A tariff as the charging script prices it, from wherever a session stands.

    `band_prices_micros[b]` holds band b's first-increment price, then its following-
    increment price below the first tier and in each tier (band 0: outside every band, the
    tariff's own prices). `band_changes` are (seconds from the event time, band index),
    ascending; the first one's band also holds before it. `tier_from_units` are where the
    tiers start in the billing period `period` (NO_PERIOD: no tiers)."""

    connect_fee_micros: int
    first_increment_units: int
    next_increment_units: int
    time_based: bool
    period: str
    tier_from_units: tuple[int, ...]
    band_prices_micros: tuple[tuple[int, ...], ...]
    band_changes: tuple[tuple[int, int], ...]
    # the arguments, built once: a cached table is sent with every request
    script_args: tuple[int | str | bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "script_args", tuple(self._script_args()))

    def schedule(self, rated_units: int, period_units: int, offset_s: int) -> PriceSchedule:
        """The price schedule over the session's cumulative units, for the units from
        `rated_units` on: unit `rated_units` is `offset_s` seconds from the event time
        (time-unit tariffs) and at `period_units` of the billing period. Segments before it
        cost what it costs: they are paid already, and cancel out of every difference."""
        first, following = self.first_increment_units, self.next_increment_units

        def aligned(units: int) -> int:
            # the first increment boundary at or after `units`: increments are never split
            if units <= first:
                return first
            return first + -(-(units - first) // following) * following

        boundaries = {first}
        if self.time_based:
            boundaries.update(aligned(rated_units + change_s - offset_s)
                              for change_s, _ in self.band_changes[1:]
                              if rated_units + change_s - offset_s > rated_units)
        boundaries.update(aligned(rated_units + from_units - period_units)
                          for from_units in self.tier_from_units if from_units > period_units)

        def prices_at(units: int) -> tuple[int, ...]:
            ahead = max(0, units - rated_units)
            band = self._band_at(offset_s + ahead if self.time_based else offset_s)
            return self.band_prices_micros[band]

        def tier_at(units: int) -> int:
            position = period_units + max(0, units - rated_units)
            return sum(1 for from_units in self.tier_from_units if from_units <= position)

        segments = [Segment(first, first, prices_at(0)[0])]
        starts = sorted(boundaries)[:MAX_SEGMENTS - 1]
        for index, start in enumerate(starts):
            end = starts[index + 1] if index + 1 < len(starts) else None
            price = prices_at(start)[1 + tier_at(start)]
            previous = segments[-1]
            if previous.increment_units == following and previous.increment_price_micros == price:
                # same price as the segment before: one segment (shorter walk in the script)
                segments[-1] = Segment(end, following, price)
            else:
                segments.append(Segment(end, following, price))
        return PriceSchedule(self.connect_fee_micros, tuple(segments))

    def _band_at(self, offset_s: int) -> int:
        band = self.band_changes[0][1]
        for change_s, changed_to in self.band_changes:
            if change_s > offset_s:
                break
            band = changed_to
        return band

    def _script_args(self) -> list[int | str | bytes]:
        """The table as the charging script reads it (store/lua/charge/, ARGV; the forms:
        store/contract.py RateTableForm)."""
        if not self.tier_from_units and len(self.band_changes) == 1:
            # the same schedule from wherever a session stands: built here, once per table,
            # rather than parsed and built by the script on every request
            return [RateTableForm.FIXED, fixed_schedule_argument(self.schedule(0, 0, 0))]
        args: list[int | str | bytes] = [
            RateTableForm.BANDED, self.connect_fee_micros, self.first_increment_units,
            self.next_increment_units,
            1 if self.time_based else 0, self.period, len(self.tier_from_units),
            *self.tier_from_units, len(self.band_prices_micros)]
        for prices in self.band_prices_micros:
            args += prices
        args.append(len(self.band_changes))
        for change_s, band in self.band_changes:
            args += [change_s, band]
        return args


@dataclass(frozen=True, slots=True)
class Band:
    """A time-of-day / day-of-week band (peak, off-peak...) in the plan's time zone: on the
    listed weekdays (0 = Monday), from start_minute to end_minute (local minutes after
    midnight, end exclusive). Outside every band the tariff's own prices apply."""

    name: str
    weekdays: frozenset[int]
    start_minute: int
    end_minute: int
    next_increment_price_micros: int
    first_increment_price_micros: int | None = None  # None: the tariff's own

    def covers(self, local: dt.datetime) -> bool:
        minute = local.hour * 60 + local.minute
        return local.weekday() in self.weekdays and self.start_minute <= minute < self.end_minute


@dataclass(frozen=True, slots=True)
class Tier:
    """From `from_units` of cumulative usage in the billing period on, the following
    increments cost `next_increment_price_micros` (or the band's price named in
    band_prices_micros while that band applies)."""

    from_units: int
    next_increment_price_micros: int
    band_prices_micros: tuple[tuple[str, int], ...] = ()

    def price_in(self, band: Band | None) -> int:
        if band is not None:
            for name, price in self.band_prices_micros:
                if name == band.name:
                    return price
        return self.next_increment_price_micros


@dataclass(frozen=True, slots=True)
class Tariff:
    rating_group: int
    service_id: int | None
    unit_kind: UnitKind
    connect_fee_micros: int = 0
    first_increment_units: int = 1
    first_increment_price_micros: int = 0
    next_increment_units: int = 1
    next_increment_price_micros: int = 0
    free: bool = False                 # no credit control: answered 4011
    default_grant_units: int = 0       # granted when the request asks for no amount
    final_unit_action: FinalAction = FinalAction.TERMINATE
    redirect_address: str = ""
    restriction_filter_ids: tuple[str, ...] = ()
    bands: tuple[Band, ...] = ()
    tiers: tuple[Tier, ...] = ()      # ascending from_units
    active_from_unix_ms: int = 0      # not used for events before this instant
    time_zone: str = "UTC"            # the plan's, for the bands

    def band_at(self, event_time_unix_ms: int) -> Band | None:
        if not self.bands:
            return None
        local = dt.datetime.fromtimestamp(event_time_unix_ms // 1000, _zone(self.time_zone))
        for band in self.bands:
            if band.covers(local):
                return band
        return None

    def tier_at(self, period_units: int) -> Tier | None:
        current = None
        for tier in self.tiers:
            if tier.from_units > period_units:
                break
            current = tier
        return current

    def first_price(self, band: Band | None) -> int:
        if band is not None and band.first_increment_price_micros is not None:
            return band.first_increment_price_micros
        return self.first_increment_price_micros

    def next_price(self, band: Band | None, tier: Tier | None) -> int:
        if tier is not None:
            return tier.price_in(band)
        if band is not None:
            return band.next_increment_price_micros
        return self.next_increment_price_micros


TariffKey = tuple[int, int | None]


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    validity_time_s: int
    quota_holding_time_s: int
    quota_threshold_percent: int
    # the first version of each tariff (earliest active_from)
    tariffs: Mapping[TariffKey, Tariff] = field(default_factory=dict)
    # every version of each tariff, ascending active_from; a key absent here has only its
    # entry in `tariffs`
    tariff_versions: Mapping[TariffKey, tuple[Tariff, ...]] = field(default_factory=dict)
    time_zone: str = "UTC"
    billing_day: int = 1  # the billing period starts on this day of the month, local midnight

    def billing_period(self, at_unix_ms: int) -> str:
        """The billing period holding the instant, named by its first day ("2026-11-01"):
        tiers count the usage within it."""
        local = dt.datetime.fromtimestamp(at_unix_ms // 1000, _zone(self.time_zone)).date()
        year, month = local.year, local.month
        if local.day < self.billing_day:
            year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        return f"{year:04d}-{month:02d}-{self.billing_day:02d}"

    def period_start_ms(self, at_unix_ms: int) -> int:
        """When the billing period holding the instant started (unix ms)."""
        first = dt.date.fromisoformat(self.billing_period(at_unix_ms))
        return _unix_ms(dt.datetime(first.year, first.month, first.day,
                                    tzinfo=_zone(self.time_zone)))

    def next_period_start_ms(self, at_unix_ms: int) -> int:
        """When the billing period after the one holding the instant starts (unix ms): the
        billing day's local midnight in the plan's time zone."""
        first = dt.date.fromisoformat(self.billing_period(at_unix_ms))
        year, month = (first.year, first.month + 1) if first.month < 12 else (first.year + 1, 1)
        start = dt.datetime(year, month, self.billing_day, tzinfo=_zone(self.time_zone))
        return _unix_ms(start)

    def tariff_for(self, rating_group: int, service_id: int | None,
                   at_unix_ms: int | None = None) -> Tariff | None:
        """The tariff of (rating group, service id), else the rating group's own: of its
        versions, the latest active at `at_unix_ms` (default: now)."""
        if at_unix_ms is None:
            at_unix_ms = time.time_ns() // 1_000_000
        if service_id is not None:
            specific = self._version_at((rating_group, service_id), at_unix_ms)
            if specific is not None:
                return specific
        return self._version_at((rating_group, None), at_unix_ms)

    def _version_at(self, key: TariffKey, at_unix_ms: int) -> Tariff | None:
        versions = self.tariff_versions.get(key)
        if versions is None:
            return self.tariffs.get(key)
        current = None
        for version in versions:
            if version.active_from_unix_ms > at_unix_ms:
                break
            current = version
        return current


class Rater(Protocol):
    """What the charging path needs from rating: the rate table of a tariff around an
    event time, looking `lookback_s` seconds back (the usage the request reports)."""

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable: ...

    def fixed_table(self, tariff: Tariff) -> RateTable | None:
        """The tariff's rate table when it is the same for every request (the request
        path then makes its arguments once, at start), else None."""
        ...


class IncrementRater:
    """The first rater: connect fee, a first increment, then the following increments
    (bands and tiers ignored)."""

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable:
        return simple_table(tariff)

    def fixed_table(self, tariff: Tariff) -> RateTable | None:
        return simple_table(tariff)

    def schedule(self, tariff: Tariff, event_time_unix_ms: int) -> PriceSchedule:
        return simple_schedule(tariff)


def fixed_schedule_argument(schedule: PriceSchedule) -> bytes:
    """A FIXED table's one argument (store/contract.py FIXED_SCHEDULE_NUMBER): the connect
    fee, then per segment its end (infinity for the last), increment and price, as binary
    doubles (exact below 2^53, as every amount here is)."""
    numbers: list[float] = [schedule.connect_fee_micros]
    for seg in schedule.segments:
        end = math.inf if seg.end_units is None else seg.end_units
        numbers += [end, seg.increment_units, seg.increment_price_micros]
    return struct.pack(f"<{len(numbers)}{FIXED_SCHEDULE_NUMBER}", *numbers)


class BandedRater:
    """The full rater: time-of-day / day-of-week bands in the plan's time zone, and tiers
    by usage in the billing period.

    What does not move with the request is kept per tariff: its prices by band and tier,
    and its band changes for a window of weeks around the event times seen (finding them
    takes time-zone arithmetic over weeks of days, about 100 us for one band), so a
    request looks them up instead."""

    def __init__(self) -> None:
        # id(tariff) -> what is kept of it (the entry holds the tariff, so that its id
        # cannot be reused by another one while the entry lives)
        self._kept: dict[int, _KeptTariff] = {}

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable:
        kept = self._kept_of(tariff)
        template = kept.template
        if not tariff.bands and not tariff.tiers:
            return template
        if tariff.unit_kind is UnitKind.TIME and tariff.bands:
            changes = self._timeline(kept, event_time_unix_ms).changes(
                event_time_unix_ms, min(max(0, lookback_s), BAND_LOOKBACK_S))
        else:
            changes = [(0, kept.band_index[id(tariff.band_at(event_time_unix_ms))])]
        return RateTable(
            template.connect_fee_micros, template.first_increment_units,
            template.next_increment_units, template.time_based,
            period if tariff.tiers else NO_PERIOD, template.tier_from_units,
            template.band_prices_micros, tuple(changes))

    def fixed_table(self, tariff: Tariff) -> RateTable | None:
        # bands and tiers move the table with the event time and the billing period
        return None if tariff.bands or tariff.tiers else self._kept_of(tariff).template

    def schedule(self, tariff: Tariff, event_time_unix_ms: int,
                 period_used_units: int = 0) -> PriceSchedule:
        """The schedule of a usage starting at the event time, with `period_used_units`
        already used in the billing period: unit 0 is the event time."""
        table = self.rate_table(tariff, event_time_unix_ms, 0, NO_PERIOD)
        return table.schedule(0, period_used_units, 0)

    def _kept_of(self, tariff: Tariff) -> _KeptTariff:
        kept = self._kept.get(id(tariff))
        if kept is not None and kept.tariff is tariff:
            return kept
        kept = _KeptTariff.of(tariff)
        if len(self._kept) >= MAX_KEPT_TARIFFS:
            self._kept.clear()
        self._kept[id(tariff)] = kept
        return kept

    def _timeline(self, kept: _KeptTariff, event_time_unix_ms: int) -> BandTimeline:
        if kept.timeline is None or not kept.timeline.covers(event_time_unix_ms):
            kept.timeline = BandTimeline.around(kept.tariff, kept.band_index,
                                                event_time_unix_ms)
        return kept.timeline


@dataclass(slots=True)
class _KeptTariff:
    """What the rater keeps of one tariff: its rate table without band changes (the whole
    table of a tariff with neither bands nor tiers), the index of each band in it, and the
    band changes found last."""

    tariff: Tariff
    template: RateTable
    band_index: dict[int, int]  # id(band or None) -> its row in the prices
    timeline: BandTimeline | None = None

    @classmethod
    def of(cls, tariff: Tariff) -> _KeptTariff:
        if not tariff.bands and not tariff.tiers:
            return cls(tariff, simple_table(tariff), {id(None): 0})
        bands: tuple[Band | None, ...] = (None, *tariff.bands)
        tiers: tuple[Tier | None, ...] = (None, *tariff.tiers)
        prices = tuple((tariff.first_price(band),
                        *(tariff.next_price(band, tier) for tier in tiers)) for band in bands)
        template = RateTable(
            connect_fee_micros=tariff.connect_fee_micros,
            first_increment_units=tariff.first_increment_units,
            next_increment_units=tariff.next_increment_units,
            time_based=tariff.unit_kind is UnitKind.TIME, period=NO_PERIOD,
            tier_from_units=tuple(tier.from_units for tier in tariff.tiers),
            band_prices_micros=prices, band_changes=((0, 0),),
        )
        return cls(tariff, template, {id(band): index for index, band in enumerate(bands)})


@dataclass(frozen=True, slots=True)
class BandTimeline:
    """The band changes of a time-unit tariff from `from_ms` to `until_ms`: the band (its
    row in the tariff's prices) in force at from_ms, then (instant, band from then on)
    for every change."""

    from_ms: int
    until_ms: int
    first_band: int
    instants_ms: tuple[int, ...]
    bands: tuple[int, ...]

    @classmethod
    def around(cls, tariff: Tariff, band_index: Mapping[int, int],
               event_time_unix_ms: int) -> BandTimeline:
        from_ms = event_time_unix_ms - (BAND_LOOKBACK_S + TIMELINE_SLACK_S) * 1000
        until_ms = event_time_unix_ms + (BAND_HORIZON_S + TIMELINE_SLACK_S) * 1000
        current = tariff.band_at(from_ms)
        instants: list[int] = []
        bands: list[int] = []
        for instant_ms in _band_edges(tariff, from_ms, until_ms):
            then = tariff.band_at(instant_ms)
            if then != current:
                instants.append(instant_ms)
                bands.append(band_index[id(then)])
                current = then
        return cls(from_ms, until_ms, band_index[id(tariff.band_at(from_ms))],
                   tuple(instants), tuple(bands))

    def covers(self, event_time_unix_ms: int) -> bool:
        return (self.from_ms <= event_time_unix_ms - BAND_LOOKBACK_S * 1000
                and event_time_unix_ms + BAND_HORIZON_S * 1000 <= self.until_ms)

    def changes(self, event_time_unix_ms: int, lookback_s: int) -> list[tuple[int, int]]:
        """(seconds from the event time, band from then on), ascending, from `lookback_s`
        before the event time to the horizon; the first one holds before it too."""
        start_ms = event_time_unix_ms - lookback_s * 1000
        first = bisect.bisect_right(self.instants_ms, start_ms)
        last = bisect.bisect_right(self.instants_ms, event_time_unix_ms + BAND_HORIZON_S * 1000)
        band_at_start = self.bands[first - 1] if first > 0 else self.first_band
        behind = [(-lookback_s, band_at_start)]
        ahead: list[tuple[int, int]] = []
        for index in range(first, last):
            # the first whole second at or after the change
            offset_s = -(-(self.instants_ms[index] - event_time_unix_ms) // 1000)
            (behind if offset_s <= 0 else ahead).append((offset_s, self.bands[index]))
        return (behind[-MAX_BAND_CHANGES_BEHIND:] + ahead)[:MAX_BAND_CHANGES]


def simple_table(tariff: Tariff) -> RateTable:
    return RateTable(
        connect_fee_micros=tariff.connect_fee_micros,
        first_increment_units=tariff.first_increment_units,
        next_increment_units=tariff.next_increment_units,
        time_based=False, period=NO_PERIOD, tier_from_units=(),
        band_prices_micros=((tariff.first_increment_price_micros,
                             tariff.next_increment_price_micros),),
        band_changes=((0, 0),),
    )


def _band_edges(tariff: Tariff, after_ms: int, until_ms: int) -> list[int]:
    """Every band start and end in (after_ms, until_ms], ascending: the candidates for a
    change; band_at decides what holds there, so DST gaps and folds need no special case."""
    zone = _zone(tariff.time_zone)
    first_day = dt.datetime.fromtimestamp(after_ms // 1000, zone).date()
    days = (until_ms - after_ms) // 86_400_000 + 2  # plus one, for time-zone shifts
    edges: set[int] = set()
    for day in range(days):
        date = first_day + dt.timedelta(days=day)
        for band in tariff.bands:
            for minute in (band.start_minute, band.end_minute):
                # aware + timedelta is wall-clock arithmetic: local midnight + minutes
                local = dt.datetime.combine(date, dt.time(), zone) + dt.timedelta(minutes=minute)
                instant_ms = _unix_ms(local)
                if after_ms < instant_ms <= until_ms:
                    edges.add(instant_ms)
    return sorted(edges)


def _unix_ms(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)  # cached by zoneinfo itself


def simple_schedule(tariff: Tariff) -> PriceSchedule:
    return simple_table(tariff).schedule(0, 0, 0)


# ---------------------------------------------------------------- plan files

_PLAN_DEFAULTS: dict[str, int] = {
    "validity_time_s": 1800,
    "quota_holding_time_s": 300,
    "quota_threshold_percent": 20,
}
PLAN_KEYS = frozenset({"name", "time_zone", "billing_day", *_PLAN_DEFAULTS})
_TARIFF_INTEGERS = (
    "connect_fee_micros", "first_increment_units", "first_increment_price_micros",
    "next_increment_units", "next_increment_price_micros", "default_grant_units",
)
_TARIFF_KEYS = {
    "rating_group", "service_id", "unit", "free", "final_unit_action", "redirect_address",
    "restriction_filter_ids", "active_from", "band", "tier", *_TARIFF_INTEGERS,
}
_BAND_KEYS = {"name", "days", "start", "end", "first_increment_price_micros",
              "next_increment_price_micros"}
_TIER_KEYS = {"from_units", "next_increment_price_micros", "band_prices_micros"}


def load_plan(path: Path) -> Plan:
    """Reads and checks a TOML plan file; raises PlanError naming file, field and reason."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise PlanError(f"{path}: cannot read: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise PlanError(f"{path}: not valid TOML: {error}") from error
    return parse_plan(data, source=str(path))


def checked_table(value: Any, where: str, allowed: Set[str]) -> dict[str, Any]:
    """A TOML table with only the `allowed` fields; PlanError naming `where` otherwise."""
    if not isinstance(value, dict):
        raise PlanError(f"{where}: must be a table")
    unknown = set(value) - allowed
    if unknown:
        raise PlanError(f"{where}.{sorted(unknown)[0]}: unknown field")
    return value


def parse_plan(data: Mapping[str, Any], source: str) -> Plan:
    """A plan file's plan: its [plan] table and its [[tariff]] tables."""
    plan_table = checked_table(data.get("plan", {}), f"{source}: plan", PLAN_KEYS)
    return parse_plan_table(plan_table, data.get("tariff", []), f"{source}: plan",
                            f"{source}: tariff", default_name=Path(source).stem)


def parse_plan_table(plan_table: Mapping[str, Any], raw_tariffs: Any, where: str,
                     tariffs_where: str, default_name: str) -> Plan:
    """A plan from its settings (PLAN_KEYS, checked by the caller) and its tariff tables;
    errors name `where` (the plan's table) or `tariffs_where` (its tariffs)."""
    settings = {
        key: _integer(plan_table.get(key, default), f"{where}.{key}", minimum=0)
        for key, default in _PLAN_DEFAULTS.items()
    }
    if settings["quota_threshold_percent"] > 100:
        raise PlanError(f"{where}.quota_threshold_percent: must be 0..100")
    billing_day = _integer(plan_table.get("billing_day", 1), f"{where}.billing_day",
                           minimum=1, maximum=MAX_BILLING_DAY)
    time_zone = plan_table.get("time_zone", "UTC")
    try:
        if not isinstance(time_zone, str):
            raise ValueError(time_zone)
        _zone(time_zone)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise PlanError(f"{where}.time_zone: {time_zone!r} is not a known time zone "
                        "(an IANA name such as 'Europe/Paris')") from None
    if not isinstance(raw_tariffs, list) or not raw_tariffs:
        raise PlanError(f"{tariffs_where}: at least one [[tariff]] table is required")
    versions: dict[TariffKey, list[Tariff]] = {}
    for index, raw in enumerate(raw_tariffs):
        tariff_where = f"{tariffs_where}[{index}]"
        tariff = _parse_tariff(raw, tariff_where, time_zone)
        key = (tariff.rating_group, tariff.service_id)
        known = versions.setdefault(key, [])
        if any(v.active_from_unix_ms == tariff.active_from_unix_ms for v in known):
            # versions of one tariff differ by their activation date
            raise PlanError(f"{tariff_where}: rating_group {key[0]} service_id {key[1]}: "
                            "defined twice (with the same active_from)")
        known.append(tariff)
    ordered = {key: tuple(sorted(found, key=lambda t: t.active_from_unix_ms))
               for key, found in versions.items()}
    return Plan(name=str(plan_table.get("name", default_name)),
                tariffs={key: found[0] for key, found in ordered.items()},
                tariff_versions=ordered, time_zone=time_zone, billing_day=billing_day,
                **settings)


def _parse_tariff(raw: Any, where: str, time_zone: str) -> Tariff:
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: must be a table")
    unknown = set(raw) - _TARIFF_KEYS
    if unknown:
        raise PlanError(f"{where}.{sorted(unknown)[0]}: unknown field")
    rating_group = _integer(raw.get("rating_group"), f"{where}.rating_group",
                            minimum=0, maximum=2**32 - 1)
    service_id = raw.get("service_id")
    if service_id is not None:
        service_id = _integer(service_id, f"{where}.service_id", minimum=0, maximum=2**32 - 1)
    unit = raw.get("unit")
    try:
        unit_kind = UnitKind(unit)
    except ValueError:
        choices = ", ".join(k.value for k in UnitKind)
        raise PlanError(f"{where}.unit: {unit!r} is not one of {choices}") from None
    integers = {key: _integer(raw[key], f"{where}.{key}", minimum=0)
                for key in _TARIFF_INTEGERS if key in raw}
    for key in ("first_increment_units", "next_increment_units"):
        if key in integers and integers[key] < 1:
            raise PlanError(f"{where}.{key}: must be at least 1")
    action = raw.get("final_unit_action", "terminate")
    try:
        final_action = FinalAction(action)
    except ValueError:
        choices = ", ".join(a.value for a in FinalAction)
        raise PlanError(f"{where}.final_unit_action: {action!r} is not one of {choices}") from None
    redirect = raw.get("redirect_address", "")
    if final_action is FinalAction.REDIRECT and not redirect:
        raise PlanError(f"{where}.redirect_address: required with final_unit_action redirect")
    filters = raw.get("restriction_filter_ids", [])
    if not isinstance(filters, list) or not all(isinstance(f, str) for f in filters):
        raise PlanError(f"{where}.restriction_filter_ids: must be a list of strings")
    free = raw.get("free", False)
    if not isinstance(free, bool):
        raise PlanError(f"{where}.free: must be true or false")
    if not free and "next_increment_price_micros" not in integers:
        raise PlanError(f"{where}.next_increment_price_micros: required unless free = true")
    bands = _parse_bands(raw.get("band", []), f"{where}.band")
    tiers = _parse_tiers(raw.get("tier", []), f"{where}.tier", bands,
                         integers.get("first_increment_units", 1),
                         integers.get("next_increment_units", 1))
    active_from_unix_ms = 0
    if "active_from" in raw:
        active_from_unix_ms = _instant(raw["active_from"], f"{where}.active_from", time_zone)
    return Tariff(
        rating_group=rating_group, service_id=service_id, unit_kind=unit_kind, free=free,
        final_unit_action=final_action, redirect_address=str(redirect),
        restriction_filter_ids=tuple(filters), bands=bands, tiers=tiers,
        active_from_unix_ms=active_from_unix_ms, time_zone=time_zone, **integers,
    )


def _tables(value: Any, where: str, limit: int) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PlanError(f"{where}: must be a list of tables ([[...]])")
    if len(value) > limit:
        raise PlanError(f"{where}: at most {limit}, got {len(value)}")
    return value


def _parse_bands(value: Any, where: str) -> tuple[Band, ...]:
    bands: list[Band] = []
    for index, raw in enumerate(_tables(value, where, MAX_BANDS_PER_TARIFF)):
        at = f"{where}[{index}]"
        unknown = set(raw) - _BAND_KEYS
        if unknown:
            raise PlanError(f"{at}.{sorted(unknown)[0]}: unknown field")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise PlanError(f"{at}.name: required, a non-empty string")
        if any(b.name == name for b in bands):
            raise PlanError(f"{at}.name: band {name!r} defined twice")
        days = raw.get("days", list(WEEKDAYS))
        if (not isinstance(days, list) or not days
                or not all(isinstance(d, str) and d in WEEKDAYS for d in days)):
            raise PlanError(f"{at}.days: must be a non-empty list of {', '.join(WEEKDAYS)}")
        start = _minute_of_day(raw.get("start"), f"{at}.start")
        end = _minute_of_day(raw.get("end"), f"{at}.end")
        if end <= start:
            raise PlanError(f"{at}.end: must be after start; a band across midnight is "
                            "written as two bands")
        if "next_increment_price_micros" not in raw:
            raise PlanError(f"{at}.next_increment_price_micros: required")
        first_price = None
        if "first_increment_price_micros" in raw:
            first_price = _integer(raw["first_increment_price_micros"],
                                   f"{at}.first_increment_price_micros", minimum=0)
        band = Band(
            name=name, weekdays=frozenset(WEEKDAYS.index(d) for d in days),
            start_minute=start, end_minute=end, first_increment_price_micros=first_price,
            next_increment_price_micros=_integer(raw["next_increment_price_micros"],
                                                 f"{at}.next_increment_price_micros",
                                                 minimum=0))
        for other in bands:
            if (band.weekdays & other.weekdays and band.start_minute < other.end_minute
                    and other.start_minute < band.end_minute):
                raise PlanError(f"{at}: band {name!r} overlaps band {other.name!r}")
        bands.append(band)
    return tuple(bands)


def _parse_tiers(value: Any, where: str, bands: Sequence[Band], first_increment_units: int,
                 next_increment_units: int) -> tuple[Tier, ...]:
    tiers: list[Tier] = []
    band_names = {b.name for b in bands}
    for index, raw in enumerate(_tables(value, where, MAX_TIERS_PER_TARIFF)):
        at = f"{where}[{index}]"
        unknown = set(raw) - _TIER_KEYS
        if unknown:
            raise PlanError(f"{at}.{sorted(unknown)[0]}: unknown field")
        from_units = _integer(raw.get("from_units"), f"{at}.from_units", minimum=1)
        if (from_units < first_increment_units
                or (from_units - first_increment_units) % next_increment_units):
            # a tier boundary inside an increment would split it between two prices
            raise PlanError(
                f"{at}.from_units: must be first_increment_units plus a whole number of "
                f"next_increment_units ({first_increment_units} + k * {next_increment_units})"
                f", got {from_units}")
        if tiers and from_units <= tiers[-1].from_units:
            raise PlanError(f"{at}.from_units: must be above the previous tier's")
        if "next_increment_price_micros" not in raw:
            raise PlanError(f"{at}.next_increment_price_micros: required")
        price = _integer(raw["next_increment_price_micros"],
                         f"{at}.next_increment_price_micros", minimum=0)
        band_prices = raw.get("band_prices_micros", {})
        if not isinstance(band_prices, dict):
            raise PlanError(f"{at}.band_prices_micros: must be a table of band name = price")
        for name, band_price in band_prices.items():
            if name not in band_names:
                raise PlanError(f"{at}.band_prices_micros.{name}: no band of that name")
            _integer(band_price, f"{at}.band_prices_micros.{name}", minimum=0)
        tiers.append(Tier(from_units, price, tuple(sorted(band_prices.items()))))
    return tuple(tiers)


def _minute_of_day(value: Any, where: str) -> int:
    """'HH:MM' (00:00 to 24:00) as minutes after midnight."""
    if isinstance(value, str) and len(value) == 5 and value[2] == ":":
        hours, minutes = value[:2], value[3:]
        if hours.isdigit() and minutes.isdigit():
            minute = int(hours) * 60 + int(minutes)
            if int(minutes) < 60 and minute <= MINUTES_PER_DAY:
                return minute
    raise PlanError(f"{where}: must be a time 'HH:MM' from '00:00' to '24:00', got {value!r}")


def _instant(value: Any, where: str, time_zone: str) -> int:
    """A TOML date or date-time as unix milliseconds; without an offset it is read in the
    plan's time zone (a date alone: its midnight)."""
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=_zone(time_zone))
    elif isinstance(value, dt.date):
        moment = dt.datetime.combine(value, dt.time(), _zone(time_zone))
    else:
        raise PlanError(f"{where}: must be a TOML date or date-time "
                        f"(2027-01-01 or 2027-01-01T00:00:00+01:00), got {value!r}")
    return _unix_ms(moment)


def _integer(value: Any, where: str, minimum: int, maximum: int = MAX_SAFE_INTEGER) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where}: must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        raise PlanError(f"{where}: must be between {minimum} and {maximum}, got {value}")
    return value

