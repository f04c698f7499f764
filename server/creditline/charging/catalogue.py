"""The product catalogue: the price plans accounts are on, read from one TOML file.

A catalogue file holds a `[catalogue]` table naming the default plan (the plan of an
account created without one, and of accounts made before plans existed) and one `[[plan]]`
table per plan: an `id`, then everything a plan file's `[plan]` has, and its tariffs as
`[[plan.tariff]]` tables. A plan file (`[plan]` and `[[tariff]]`, as before catalogues) is
read as a catalogue of that one plan, its id the plan's name, so existing files keep
working. Errors name the file, the field and the reason, as a plan file's do.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from creditline.charging.rating import (
    PLAN_KEYS,
    Plan,
    UnitKind,
    checked_table,
    parse_plan,
    parse_plan_table,
)
from creditline.errors import PlanError
from creditline.store.contract import ID_CHARACTERS, MAX_SAFE_INTEGER

# The most plans one catalogue holds, and the longest plan id. An id is written into the
# account and sent to the charging script with every request: ID_CHARACTERS only (no ';'
# or '|', which the script's answers use).
MAX_PLANS = 1_000
MAX_PLAN_ID_BYTES = 64
# Offers: at most this many, each granting at most this many allowances (buckets), valid
# at most this long.
MAX_OFFERS = 1_000
MAX_ALLOWANCES_PER_OFFER = 8
MAX_OFFER_VALIDITY_S = 366 * 86_400
_CATALOGUE_KEYS = frozenset({"default_plan"})
_TOP_LEVEL_KEYS = frozenset({"catalogue", "plan", "offer"})
_ADD_ON_KEYS = frozenset({"id", "kind", "price_micros", "validity_s", "plans", "allowance"})
_RECURRING_KEYS = frozenset({"id", "kind", "fee_micros", "period", "period_days",
                             "on_short_balance", "plans", "allowance"})
_ALLOWANCE_KEYS = frozenset({"rating_group", "unit", "units", "priority"})
_RECURRING_ALLOWANCE_KEYS = _ALLOWANCE_KEYS | {"rollover_cap_units"}
# The offer kinds:
# - an add-on, bought once (Admin.BuyAddOn): its price, and allowances as buckets that
#   end with its validity;
# - a recurring offer, subscribed to (Admin.SubscribeToOffer) and renewed at every
#   period boundary until cancelled: a fee per period, and allowances as buckets that end
#   with the period (what is left rolling over, up to a cap, into the next one).
ADD_ON = "add_on"
RECURRING = "recurring"
# A recurring offer's period: monthly, from the account's billing day (its plan's), or
# every period_days days from the subscription.
MONTHLY = "monthly"
DAYS = "days"
MAX_PERIOD_DAYS = 366


class ShortBalancePolicy(StrEnum):
    """What a renewal does when the money cannot pay the fee (the offer says)."""

    # the fee must be paid from the balance (without the credit limit): else the offer is
    # suspended (no fee, no allowances) until its next boundary or a new subscription
    SUSPEND = "suspend"
    # as SUSPEND, and the account is barred (charging refused) until set active again
    BAR = "bar"
    # the fee may take the balance down to minus the credit limit; beyond it, SUSPEND
    CREDIT_LIMIT = "credit_limit"


@dataclass(frozen=True, slots=True)
class Allowance:
    """Units an offer grants, as one bucket of the account."""

    rating_group: int
    unit_kind: UnitKind
    units: int
    priority: int  # lower is used first (buckets' order)
    # a recurring offer's: at most this many units left at a period's end are carried
    # into the next period's bucket (0: none)
    rollover_cap_units: int = 0


@dataclass(frozen=True, slots=True)
class Offer:
    offer_id: str
    kind: str              # ADD_ON or RECURRING
    # an add-on's price; a recurring offer's fee per period
    price_micros: int
    validity_s: int        # an add-on's (0 for a recurring offer)
    plans: frozenset[str]  # the plans it is sold with (all the catalogue's when not named)
    allowances: tuple[Allowance, ...]
    # a recurring offer's: MONTHLY or DAYS (then every period_days), and its policy
    period: str = ""
    period_days: int = 0
    on_short_balance: ShortBalancePolicy = ShortBalancePolicy.SUSPEND

    @property
    def recurring(self) -> bool:
        return self.kind == RECURRING


@dataclass(frozen=True, slots=True)
class Catalogue:
    plans: Mapping[str, Plan]  # plan id -> plan, in the file's order
    default_plan_id: str
    # what every process serving this file agrees on: a digest of the file's bytes
    version: str
    offers: Mapping[str, Offer] = field(default_factory=dict)  # offer id -> offer

    @property
    def default_plan(self) -> Plan:
        return self.plans[self.default_plan_id]


def load_catalogue(path: Path) -> Catalogue:
    """Reads and checks a catalogue file (or a plan file); raises PlanError naming file,
    field and reason."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise PlanError(f"{path}: cannot read: {error.strerror}") from error
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise PlanError(f"{path}: not valid TOML: {error}") from error
    return parse_catalogue(data, str(path), hashlib.sha256(raw).hexdigest()[:16])


def parse_catalogue(data: Mapping[str, Any], source: str, version: str) -> Catalogue:
    if "tariff" in data or isinstance(data.get("plan"), dict):  # a plan file
        plan = parse_plan(data, source)
        check_plan_id(plan.name, f"{source}: plan.name")
        return Catalogue(plans={plan.name: plan}, default_plan_id=plan.name, version=version)
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise PlanError(f"{source}: {sorted(unknown)[0]}: unknown table")
    plans = _plans(data.get("plan"), source)
    settings = checked_table(data.get("catalogue", {}), f"{source}: catalogue",
                             _CATALOGUE_KEYS)
    default = settings.get("default_plan", next(iter(plans)))
    if default not in plans:
        raise PlanError(f"{source}: catalogue.default_plan: {default!r} is not a plan of "
                        f"the catalogue ({', '.join(sorted(plans))})")
    offers = _offers(data.get("offer", []), source, plans)
    return Catalogue(plans=plans, default_plan_id=default, version=version, offers=offers)


def _offers(tables: Any, source: str, plans: Mapping[str, Plan]) -> dict[str, Offer]:
    if not isinstance(tables, list):
        raise PlanError(f"{source}: offer: must be [[offer]] tables")
    if len(tables) > MAX_OFFERS:
        raise PlanError(f"{source}: offer: at most {MAX_OFFERS} offers, got {len(tables)}")
    offers: dict[str, Offer] = {}
    for index, table in enumerate(tables):
        offer = _offer(table, f"{source}: offer[{index}]", plans)
        if offer.offer_id in offers or offer.offer_id in plans:
            raise PlanError(f"{source}: offer[{index}].id: {offer.offer_id!r} names an "
                            "earlier offer or a plan")
        offers[offer.offer_id] = offer
    return offers


def _offer(raw: Any, where: str, plans: Mapping[str, Plan]) -> Offer:
    kind = raw.get("kind", ADD_ON) if isinstance(raw, dict) else ADD_ON
    if kind not in (ADD_ON, RECURRING):
        raise PlanError(f"{where}.kind: {kind!r} is not one of {ADD_ON}, {RECURRING}")
    recurring = kind == RECURRING
    table = checked_table(raw, where, _RECURRING_KEYS if recurring else _ADD_ON_KEYS)
    offer_id = check_plan_id(table.get("id"), f"{where}.id")
    named = table.get("plans", list(plans))
    if not isinstance(named, list) or not named or not all(p in plans for p in named):
        raise PlanError(f"{where}.plans: a list of the catalogue's plan ids "
                        f"({', '.join(plans)})")
    allowances = _allowances(table.get("allowance", []), where, recurring)
    if not recurring:
        return Offer(offer_id=offer_id, kind=kind, plans=frozenset(named),
                     allowances=allowances,
                     price_micros=_whole(table.get("price_micros"), f"{where}.price_micros",
                                         MAX_SAFE_INTEGER),
                     validity_s=_whole(table.get("validity_s"), f"{where}.validity_s",
                                       MAX_OFFER_VALIDITY_S, minimum=1))
    period, period_days = _period(table, where)
    try:
        policy = ShortBalancePolicy(table.get("on_short_balance", ShortBalancePolicy.SUSPEND))
    except ValueError:
        choices = ", ".join(p.value for p in ShortBalancePolicy)
        raise PlanError(f"{where}.on_short_balance: {table.get('on_short_balance')!r} is not "
                        f"one of {choices}") from None
    return Offer(offer_id=offer_id, kind=kind, plans=frozenset(named), allowances=allowances,
                 price_micros=_whole(table.get("fee_micros"), f"{where}.fee_micros",
                                     MAX_SAFE_INTEGER),
                 validity_s=0, period=period, period_days=period_days,
                 on_short_balance=policy)


def _period(table: Mapping[str, Any], where: str) -> tuple[str, int]:
    """A recurring offer's period: (MONTHLY, 0) or (DAYS, n)."""
    period = table.get("period", DAYS if "period_days" in table else None)
    if period == MONTHLY and "period_days" not in table:
        return MONTHLY, 0
    if period == DAYS:
        return DAYS, _whole(table.get("period_days"), f"{where}.period_days", MAX_PERIOD_DAYS,
                            minimum=1)
    raise PlanError(f"{where}.period: required, {MONTHLY!r} (from the account's billing day) "
                    f"or period_days = 1..{MAX_PERIOD_DAYS} (every n days), not both")


def _allowances(raw: Any, where: str, recurring: bool) -> tuple[Allowance, ...]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ALLOWANCES_PER_OFFER:
        raise PlanError(f"{where}.allowance: 1..{MAX_ALLOWANCES_PER_OFFER} [[offer.allowance]]"
                        " tables")
    keys = _RECURRING_ALLOWANCE_KEYS if recurring else _ALLOWANCE_KEYS
    return tuple(_allowance(checked_table(a, f"{where}.allowance[{i}]", keys),
                            f"{where}.allowance[{i}]") for i, a in enumerate(raw))


def _allowance(table: Mapping[str, Any], where: str) -> Allowance:
    rating_group = _whole(table.get("rating_group"), f"{where}.rating_group", 2**32 - 1)
    try:
        unit_kind = UnitKind(table.get("unit"))
    except ValueError:
        choices = ", ".join(k.value for k in UnitKind)
        raise PlanError(f"{where}.unit: {table.get('unit')!r} is not one of {choices}") from None
    return Allowance(rating_group=rating_group, unit_kind=unit_kind,
                     units=_whole(table.get("units"), f"{where}.units", MAX_SAFE_INTEGER,
                                  minimum=1),
                     priority=_whole(table.get("priority", 0), f"{where}.priority", 2**32 - 1),
                     rollover_cap_units=_whole(table.get("rollover_cap_units", 0),
                                               f"{where}.rollover_cap_units", MAX_SAFE_INTEGER))


def _whole(value: Any, where: str, maximum: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise PlanError(f"{where}: required, a whole number {minimum}..{maximum}")
    return value


def _plans(tables: Any, source: str) -> dict[str, Plan]:
    if not isinstance(tables, list) or not tables:
        raise PlanError(f"{source}: plan: at least one [[plan]] table is required")
    if len(tables) > MAX_PLANS:
        raise PlanError(f"{source}: plan: at most {MAX_PLANS} plans, got {len(tables)}")
    plans: dict[str, Plan] = {}
    for index, table in enumerate(tables):
        where = f"{source}: plan[{index}]"
        checked_table(table, where, PLAN_KEYS | {"id", "tariff"})
        if "name" in table:  # (a plan file's plan is named by its name)
            raise PlanError(f"{where}.name: a catalogue's plan is named by its id")
        plan_id = check_plan_id(table.get("id"), f"{where}.id")
        if plan_id in plans:
            raise PlanError(f"{where}.id: {plan_id!r} is the id of an earlier plan too")
        settings = {key: value for key, value in table.items() if key in PLAN_KEYS}
        plans[plan_id] = parse_plan_table(settings, table.get("tariff", []), where,
                                          f"{where}.tariff", default_name=plan_id)
    return plans


def check_plan_id(value: Any, where: str) -> str:
    """A plan id as the catalogue and the Admin API accept it."""
    if not isinstance(value, str) or not value:
        raise PlanError(f"{where}: required, a non-empty string")
    if len(value.encode()) > MAX_PLAN_ID_BYTES:
        raise PlanError(f"{where}: at most {MAX_PLAN_ID_BYTES} bytes")
    bad = next((c for c in value if c not in ID_CHARACTERS), None)
    if bad is not None:
        raise PlanError(f"{where}: {bad!r} is not allowed (letters, digits and "
                        f"{ID_CHARACTERS[62:]})")
    return value


class PlansSeen:
    """The plan each account was last seen on (by this process), so that its next request
    is priced by the right plan in one round trip: the charging script checks the plan a
    request was priced by and names the account's own when they differ. Accounts on the
    default plan take no room; at most `capacity` others, the oldest forgotten first (a
    forgotten account costs its next request one more round trip, no more)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._plans: dict[str, str] = {}  # (insertion order: the oldest first)

    def plan_of(self, account_id: str, default_plan_id: str) -> str:
        return self._plans.get(account_id, default_plan_id)

    def remember(self, account_id: str, plan_id: str, default_plan_id: str) -> None:
        self._plans.pop(account_id, None)
        if plan_id == default_plan_id or self._capacity <= 0:
            return
        if len(self._plans) >= self._capacity:
            del self._plans[next(iter(self._plans))]
        self._plans[account_id] = plan_id
