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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from creditline.charging.rating import (
    PLAN_KEYS,
    Plan,
    checked_table,
    parse_plan,
    parse_plan_table,
)
from creditline.errors import PlanError
from creditline.store.contract import ID_CHARACTERS

# The most plans one catalogue holds, and the longest plan id. An id is written into the
# account and sent to the charging script with every request: ID_CHARACTERS only (no ';'
# or '|', which the script's answers use).
MAX_PLANS = 1_000
MAX_PLAN_ID_BYTES = 64
_CATALOGUE_KEYS = frozenset({"default_plan"})
_TOP_LEVEL_KEYS = frozenset({"catalogue", "plan"})


@dataclass(frozen=True, slots=True)
class Catalogue:
    plans: Mapping[str, Plan]  # plan id -> plan, in the file's order
    default_plan_id: str
    # what every process serving this file agrees on: a digest of the file's bytes
    version: str

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
    return Catalogue(plans=plans, default_plan_id=default, version=version)


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

    def __init__(self, capacity: int, default_plan_id: str) -> None:
        self._capacity = capacity
        self._default = default_plan_id
        self._plans: dict[str, str] = {}  # (insertion order: the oldest first)

    def plan_of(self, account_id: str) -> str:
        return self._plans.get(account_id, self._default)

    def remember(self, account_id: str, plan_id: str) -> None:
        self._plans.pop(account_id, None)
        if plan_id == self._default or self._capacity <= 0:
            return
        if len(self._plans) >= self._capacity:
            del self._plans[next(iter(self._plans))]
        self._plans[account_id] = plan_id
