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
_OFFER_KEYS = frozenset({"id", "kind", "price_micros", "validity_s", "plans", "allowance"})
_ALLOWANCE_KEYS = frozenset({"rating_group", "unit", "units", "priority"})
# The offer kinds sold today: an add-on, bought once (Admin.BuyAddOn), its allowances
# buckets that end with its validity. (Recurring offers: not yet.)
ADD_ON = "add_on"


@dataclass(frozen=True, slots=True)
class Allowance:
    """Units an offer grants, as one bucket of the account."""

    rating_group: int
    unit_kind: UnitKind
    units: int
    priority: int  # lower is used first (buckets' order)


@dataclass(frozen=True, slots=True)
class Offer:
    offer_id: str
    kind: str
    price_micros: int
    validity_s: int
    plans: frozenset[str]  # the plans it is sold with (all the catalogue's when not named)
    allowances: tuple[Allowance, ...]


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
        offer = _offer(checked_table(table, f"{source}: offer[{index}]", _OFFER_KEYS),
                       f"{source}: offer[{index}]", plans)
        if offer.offer_id in offers or offer.offer_id in plans:
            raise PlanError(f"{source}: offer[{index}].id: {offer.offer_id!r} names an "
                            "earlier offer or a plan")
        offers[offer.offer_id] = offer
    return offers


def _offer(table: Mapping[str, Any], where: str, plans: Mapping[str, Plan]) -> Offer:
    offer_id = check_plan_id(table.get("id"), f"{where}.id")
    kind = table.get("kind", ADD_ON)
    if kind != ADD_ON:
        raise PlanError(f"{where}.kind: {kind!r}: only {ADD_ON!r} offers are sold so far "
                        "(recurring offers are not built yet)")
    price = _whole(table.get("price_micros"), f"{where}.price_micros", MAX_SAFE_INTEGER)
    validity_s = _whole(table.get("validity_s"), f"{where}.validity_s", MAX_OFFER_VALIDITY_S,
                        minimum=1)
    named = table.get("plans", list(plans))
    if not isinstance(named, list) or not named or not all(p in plans for p in named):
        raise PlanError(f"{where}.plans: a list of the catalogue's plan ids "
                        f"({', '.join(plans)})")
    raw = table.get("allowance", [])
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ALLOWANCES_PER_OFFER:
        raise PlanError(f"{where}.allowance: 1..{MAX_ALLOWANCES_PER_OFFER} [[offer.allowance]]"
                        " tables")
    allowances = tuple(_allowance(checked_table(a, f"{where}.allowance[{i}]", _ALLOWANCE_KEYS),
                                  f"{where}.allowance[{i}]") for i, a in enumerate(raw))
    return Offer(offer_id=offer_id, kind=kind, price_micros=price, validity_s=validity_s,
                 plans=frozenset(named), allowances=allowances)


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
                     priority=_whole(table.get("priority", 0), f"{where}.priority", 2**32 - 1))


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
