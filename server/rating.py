"""Tariffs, the plan file that holds them, and the price schedule the charging script walks.

A tariff prices one rating group (optionally narrowed by a service id): a connect fee, a
first increment and the following increments, each with its price in micro-units. Usage
is rounded up to whole increments; that is the one rounding rule.

Rating is behind one small interface, `Rater`: it turns the tariff that applies to a
request into a `PriceSchedule`, a piecewise-linear price list of segments that the Lua
charging script (server/lua/charge.lua) walks atomically against the balance. The
schedule's `cost` and `max_units_within` here are the reference for the Lua functions of
the same names; the tests check that both agree.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Lua numbers are doubles: every unit count and amount must stay below 2^53.
MAX_SAFE_INTEGER = 2**53 - 1


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


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    validity_time_s: int
    quota_holding_time_s: int
    quota_threshold_percent: int
    tariffs: Mapping[tuple[int, int | None], Tariff] = field(default_factory=dict)

    def tariff_for(self, rating_group: int, service_id: int | None) -> Tariff | None:
        """The tariff of (rating group, service id), else the rating group's own."""
        if service_id is not None:
            specific = self.tariffs.get((rating_group, service_id))
            if specific is not None:
                return specific
        return self.tariffs.get((rating_group, None))


class Rater(Protocol):
    """What the charging path needs from rating (the Cython kernels will implement it)."""

    def schedule(self, tariff: Tariff, event_time_unix_ms: int) -> PriceSchedule: ...


class IncrementRater:
    """The first rater: connect fee, a first increment, then the following increments."""

    def schedule(self, tariff: Tariff, event_time_unix_ms: int) -> PriceSchedule:
        return simple_schedule(tariff)


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
    "restriction_filter_ids", *_TARIFF_INTEGERS,
}


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
    raw_tariffs = data.get("tariff", [])
    if not isinstance(raw_tariffs, list) or not raw_tariffs:
        raise PlanError(f"{source}: tariff: at least one [[tariff]] table is required")
    tariffs: dict[tuple[int, int | None], Tariff] = {}
    for index, raw in enumerate(raw_tariffs):
        where = f"{source}: tariff[{index}]"
        tariff = _parse_tariff(raw, where)
        key = (tariff.rating_group, tariff.service_id)
        if key in tariffs:
            raise PlanError(f"{where}: rating_group {key[0]} service_id {key[1]}: "
                            "defined twice")
        tariffs[key] = tariff
    return Plan(name=str(plan_table.get("name", Path(source).stem)), tariffs=tariffs,
                **settings)


def _parse_tariff(raw: Any, where: str) -> Tariff:
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
    return Tariff(
        rating_group=rating_group, service_id=service_id, unit_kind=unit_kind, free=free,
        final_unit_action=final_action, redirect_address=str(redirect),
        restriction_filter_ids=tuple(filters), **integers,
    )


def _integer(value: Any, where: str, minimum: int, maximum: int = MAX_SAFE_INTEGER) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where}: must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        raise PlanError(f"{where}: must be between {minimum} and {maximum}, got {value}")
    return value

