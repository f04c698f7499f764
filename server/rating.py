"""Tariffs, the plan file that holds them, and the price schedule the charging script walks.

A tariff prices one rating group (optionally narrowed by a service id): a connect fee, a
first increment and the following increments, each with its price in micro-units. Usage
is rounded up to whole increments; that is the one rounding rule.

Rating is behind one small interface, `Rater`: it turns the tariff that applies to a
request into a `PriceSchedule`, a piecewise-linear price list of segments that the Lua
charging script (server/lua/charge.lua) walks atomically against the balance. The
schedule's `cost` and `max_units_within` here are the reference for the Lua functions of
the same names; the tests check that both agree.

`BandedRater` builds schedules from the full tariff: time-of-day / day-of-week bands in the
plan's time zone, tiers by cumulative usage, both turned into segment ends. Every segment
end it makes falls on an increment boundary, so an increment is never split: an increment
that starts in a band (or tier) is priced by that band (or tier) whole.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import time
import tomllib
import zoneinfo
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Lua numbers are doubles: every unit count and amount must stay below 2^53.
MAX_SAFE_INTEGER = 2**53 - 1
# Segments in one schedule: bounds the charging script's walk and the kernels' arrays
# (native/kernels.pyx holds them in fixed C arrays of this size).
MAX_SEGMENTS = 64
# How far ahead band changes are looked for: a time-unit schedule covers a week of usage
# from the event time; beyond it (or beyond MAX_SEGMENTS) the last band's price goes on.
BAND_HORIZON_S = 7 * 24 * 3600
MAX_BANDS_PER_TARIFF = 16
MAX_TIERS_PER_TARIFF = 16
MINUTES_PER_DAY = 24 * 60
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order


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
    connect_fee_micros: int
    segments: tuple[Segment, ...]

    def cost(self, units: int) -> int:
        """Price of the first `units` units (connect fee once, increments rounded up)."""
        if units <= 0:
            return 0
        total, start = self.connect_fee_micros, 0
        for seg in self.segments:
            stop = units if seg.end_units is None else min(units, seg.end_units)
            total += -(-(stop - start) // seg.increment_units) * seg.increment_price_micros
            if total >= MAX_SAFE_INTEGER:
                return MAX_SAFE_INTEGER
            if seg.end_units is None or units <= seg.end_units:
                return total
            start = seg.end_units
        return MAX_SAFE_INTEGER

    def max_units_within(self, budget_micros: int) -> float:
        """The largest unit count at an increment boundary whose cost is within budget
        (math.inf when the rest is free)."""
        if budget_micros < self.connect_fee_micros:
            return 0
        spent, start = self.connect_fee_micros, 0
        for seg in self.segments:
            if seg.end_units is None:
                if seg.increment_price_micros <= 0:
                    return math.inf
                buyable = (budget_micros - spent) // seg.increment_price_micros
                return start + buyable * seg.increment_units
            increments = -(-(seg.end_units - start) // seg.increment_units)
            if seg.increment_price_micros > 0:
                buyable = (budget_micros - spent) // seg.increment_price_micros
                if buyable < increments:
                    return start + buyable * seg.increment_units
            spent += increments * seg.increment_price_micros
            start = seg.end_units
        return start

    def affordable_units(self, from_units: int, amount_micros: int, wanted_units: int) -> int:
        """Units beyond `from_units` (at most `wanted_units`) that the amount pays for."""
        reach = self.max_units_within(self.cost(from_units) + max(0, amount_micros))
        return int(max(0, min(wanted_units, reach - from_units)))

    def as_script_args(self) -> list[int]:
        args: list[int] = [self.connect_fee_micros, len(self.segments)]
        for seg in self.segments:
            end = -1 if seg.end_units is None else seg.end_units
            args += [end, seg.increment_units, seg.increment_price_micros]
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
    """What the charging path needs from rating (the Cython kernels will implement it)."""

    def schedule(self, tariff: Tariff, event_time_unix_ms: int) -> PriceSchedule: ...


class IncrementRater:
    """The first rater: connect fee, a first increment, then the following increments."""

    def schedule(self, tariff: Tariff, event_time_unix_ms: int) -> PriceSchedule:
        return simple_schedule(tariff)


class BandedRater:
    """The full rater: bands and tiers become segment ends, aligned on increments.

    Unit 0 of the schedule is `event_time_unix_ms` (for time-unit tariffs, unit k is k
    seconds later), and tiers count from `period_used_units`, the usage of the billing
    period before the schedule starts."""

    def schedule(self, tariff: Tariff, event_time_unix_ms: int,
                 period_used_units: int = 0) -> PriceSchedule:
        if not tariff.bands and not tariff.tiers:
            return simple_schedule(tariff)
        return banded_schedule(tariff, event_time_unix_ms, period_used_units)


def banded_schedule(tariff: Tariff, event_time_unix_ms: int,
                    period_used_units: int) -> PriceSchedule:
    first, following = tariff.first_increment_units, tariff.next_increment_units

    def aligned(offset_units: int) -> int:
        # the first increment boundary at or after the offset: increments are never split
        if offset_units <= first:
            return first
        return first + -(-(offset_units - first) // following) * following

    changes = _band_changes(tariff, event_time_unix_ms)
    boundaries = {aligned(offset) for offset, _ in changes}
    boundaries.update(aligned(tier.from_units - period_used_units) for tier in tariff.tiers
                      if tier.from_units > period_used_units)
    boundaries.add(first)

    def band_at(offset_units: int) -> Band | None:
        band = changes[0][1]
        for change_offset, changed_to in changes:
            if change_offset > offset_units:
                break
            band = changed_to
        return band

    segments = [Segment(first, first, tariff.first_price(band_at(0)))]
    starts = sorted(boundaries)[:MAX_SEGMENTS - 1]
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else None
        price = tariff.next_price(band_at(start), tariff.tier_at(period_used_units + start))
        previous = segments[-1]
        if previous.increment_units == following and previous.increment_price_micros == price:
            # same price as the segment before: one segment (shorter walk in the script)
            segments[-1] = Segment(end, following, price)
        else:
            segments.append(Segment(end, following, price))
    return PriceSchedule(tariff.connect_fee_micros, tuple(segments))


def _band_changes(tariff: Tariff, event_time_unix_ms: int) -> list[tuple[int, Band | None]]:
    """(offset in units, band from then on), the first at offset 0. Only time-unit tariffs
    change band during a usage; for others the band at the event time holds throughout."""
    changes: list[tuple[int, Band | None]] = [(0, tariff.band_at(event_time_unix_ms))]
    if tariff.unit_kind is not UnitKind.TIME or not tariff.bands:
        return changes
    zone = _zone(tariff.time_zone)
    horizon_ms = event_time_unix_ms + BAND_HORIZON_S * 1000
    first_day = dt.datetime.fromtimestamp(event_time_unix_ms // 1000, zone).date()
    # Candidate instants: every band start and end on the days of the horizon (plus one,
    # for time-zone shifts); band_at decides what holds there, so DST gaps and folds need
    # no special case.
    candidates: set[int] = set()
    for day in range(BAND_HORIZON_S // 86400 + 2):
        date = first_day + dt.timedelta(days=day)
        for band in tariff.bands:
            for minute in (band.start_minute, band.end_minute):
                # aware + timedelta is wall-clock arithmetic: local midnight + minutes
                local = dt.datetime.combine(date, dt.time(), zone) + dt.timedelta(minutes=minute)
                instant_ms = _unix_ms(local)
                if event_time_unix_ms < instant_ms <= horizon_ms:
                    candidates.add(instant_ms)
    current = changes[0][1]
    for instant_ms in sorted(candidates):
        then = tariff.band_at(instant_ms)
        if then != current:
            # the first whole second at or after the change
            changes.append((-(-(instant_ms - event_time_unix_ms) // 1000), then))
            current = then
    return changes


def _unix_ms(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)  # cached by zoneinfo itself


def simple_schedule(tariff: Tariff) -> PriceSchedule:
    return PriceSchedule(
        connect_fee_micros=tariff.connect_fee_micros,
        segments=(
            Segment(tariff.first_increment_units, tariff.first_increment_units,
                    tariff.first_increment_price_micros),
            Segment(None, tariff.next_increment_units, tariff.next_increment_price_micros),
        ),
    )


# ---------------------------------------------------------------- plan files

class PlanError(ValueError):
    """A plan file that cannot be used; the message names file, field and reason."""


_PLAN_DEFAULTS: dict[str, int] = {
    "validity_time_s": 1800,
    "quota_holding_time_s": 300,
    "quota_threshold_percent": 20,
}
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


def parse_plan(data: Mapping[str, Any], source: str) -> Plan:
    plan_table = data.get("plan", {})
    if not isinstance(plan_table, dict):
        raise PlanError(f"{source}: plan: must be a table")
    settings = {
        key: _integer(plan_table.get(key, default), f"{source}: plan.{key}", minimum=0)
        for key, default in _PLAN_DEFAULTS.items()
    }
    if settings["quota_threshold_percent"] > 100:
        raise PlanError(f"{source}: plan.quota_threshold_percent: must be 0..100")
    time_zone = plan_table.get("time_zone", "UTC")
    try:
        if not isinstance(time_zone, str):
            raise ValueError(time_zone)
        _zone(time_zone)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise PlanError(f"{source}: plan.time_zone: {time_zone!r} is not a known time zone "
                        "(an IANA name such as 'Europe/Paris')") from None
    raw_tariffs = data.get("tariff", [])
    if not isinstance(raw_tariffs, list) or not raw_tariffs:
        raise PlanError(f"{source}: tariff: at least one [[tariff]] table is required")
    versions: dict[TariffKey, list[Tariff]] = {}
    for index, raw in enumerate(raw_tariffs):
        where = f"{source}: tariff[{index}]"
        tariff = _parse_tariff(raw, where, time_zone)
        key = (tariff.rating_group, tariff.service_id)
        known = versions.setdefault(key, [])
        if any(v.active_from_unix_ms == tariff.active_from_unix_ms for v in known):
            # versions of one tariff differ by their activation date
            raise PlanError(f"{where}: rating_group {key[0]} service_id {key[1]}: "
                            "defined twice (with the same active_from)")
        known.append(tariff)
    ordered = {key: tuple(sorted(found, key=lambda t: t.active_from_unix_ms))
               for key, found in versions.items()}
    return Plan(name=str(plan_table.get("name", Path(source).stem)),
                tariffs={key: found[0] for key, found in ordered.items()},
                tariff_versions=ordered, time_zone=time_zone, **settings)


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

