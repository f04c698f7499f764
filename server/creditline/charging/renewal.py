"""Renews subscriptions at their period ends, and applies plan changes scheduled for the
next billing period, exactly once each, whatever the number of processes and restarts.

What falls due lives in Redis (each partition's renewals set, scored by when), so a
restart loses none. Every process sweeps every partition; the script renews a
subscription only from the period end this process read, so a second process renewing
the same period finds it renewed (NOT_DUE) and changes nothing. A subscription whose
periods passed while no process ran renews once per period, one per pass, each with its
fee.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Protocol

from creditline.charging.catalogue import Catalogue
from creditline.charging.subscriptions import allowance_args, next_period_end_ms
from creditline.clock import Clock
from creditline.store.contract import due_item, plan_in_force
from creditline.store.sweep import PeriodicSweep

log = logging.getLogger(__name__)
# What RENEW answers when it did something: renewed, the money-short policy applied, a
# cancelled subscription ended.
_DONE = frozenset({"OK", "SHORT", "ENDED"})


class AdminOutcome(Protocol):
    @property
    def status(self) -> str: ...
    @property
    def account(self) -> object | None: ...


class RenewalStore(Protocol):
    """What renewal needs of the store (creditline.store.store.Store is one): charging
    depends on the store's contract, not on its client."""

    @property
    def clock(self) -> Clock: ...
    async def due(self, partition: int, now_ms: int, limit: int
                  ) -> list[tuple[str, int]]: ...
    async def plan_fields(self, account_id: str
                          ) -> tuple[str | None, str | None, str | None]: ...
    async def admin(self, account_id: str, operation: str, *args: int | str
                    ) -> AdminOutcome: ...


class Renewer(PeriodicSweep):
    name = "renewal"

    def __init__(self, store: RenewalStore, partitions: int,
                 catalogue: Callable[[], Catalogue], interval_s: float, batch: int) -> None:
        super().__init__(interval_s)
        self._store = store
        self._partitions = partitions
        self._catalogue = catalogue  # the one served now (a reload changes it)
        self._batch = batch
        self.renewed = 0

    async def sweep_once(self) -> int:
        partitions = list(range(self._partitions))
        random.shuffle(partitions)  # processes sweeping together start in different places
        done = 0
        for partition in partitions:
            now_ms = self._store.clock.now_ms()
            for member, due_ms in await self._store.due(partition, now_ms, self._batch):
                offer_id, account_id = due_item(member)
                if not offer_id:
                    done += await self._plan_due(account_id)
                else:
                    done += await self._renew(account_id, offer_id, due_ms)
        self.renewed += done
        return done

    async def _plan_due(self, account_id: str) -> int:
        result = await self._store.admin(account_id, "PLAN_DUE")
        return int(result.account is not None)

    async def _renew(self, account_id: str, offer_id: str, due_ms: int) -> int:
        catalogue = self._catalogue()
        offer = catalogue.offers.get(offer_id)
        if offer is None or not offer.recurring:
            # (a reload refuses to drop an offer in use: a process on an older file)
            log.warning("renewal of %r for account %r: not a recurring offer of catalogue "
                        "%s; left for a process that has it", offer_id, account_id,
                        catalogue.version)
            return 0
        plan_id = plan_in_force(*await self._store.plan_fields(account_id),
                                catalogue.default_plan_id, due_ms)
        plan = catalogue.plans.get(plan_id, catalogue.default_plan)
        next_end_ms = next_period_end_ms(offer, plan, due_ms)
        result = await self._store.admin(
            account_id, "RENEW", offer_id, due_ms, next_end_ms, offer.price_micros,
            offer.on_short_balance.value, *allowance_args(offer, next_end_ms))
        return int(result.status in _DONE)
