"""Recurring offers' periods: when each ends, what the first one costs, what the charging
store is told to grant. The store (admin/subscriptions.lua) applies them, once each.

A monthly offer's periods are the account's billing periods (its plan's billing day, local
midnight in the plan's time zone): the first one, from the subscription to the next
billing day, costs the fee and grants the allowances in proportion to the time left of
the billing period (rounded down to the micro-unit and the unit); every later one costs
the whole fee. An offer of every n days has periods of n days from the subscription, each
the whole fee.
"""

from __future__ import annotations

from dataclasses import dataclass

from creditline.charging.catalogue import MONTHLY, Offer
from creditline.charging.rating import Plan

DAY_MS = 86_400_000
# An allowance's bucket outlives its period by this much: from the period's end until its
# renewal replaces it (each process looks for renewals every renewal_interval_s) the
# period's allowance is still drawn on, instead of usage being charged in money for want
# of a bucket. A renewal later than this (no process ran) finds the bucket expired, and
# nothing of it rolls over.
ALLOWANCE_GRACE_S = 86_400


@dataclass(frozen=True, slots=True)
class FirstPeriod:
    end_ms: int
    fee_micros: int
    # the part of each allowance granted, as the fee's: numerator / denominator
    share: tuple[int, int]

    def part(self, whole: int) -> int:
        numerator, denominator = self.share
        return whole * numerator // denominator


def first_period(offer: Offer, plan: Plan, now_ms: int) -> FirstPeriod:
    """The period a subscription made now pays for first."""
    if offer.period != MONTHLY:
        return FirstPeriod(now_ms + offer.period_days * DAY_MS, offer.price_micros, (1, 1))
    start_ms, end_ms = plan.period_start_ms(now_ms), plan.next_period_start_ms(now_ms)
    left_ms, whole_ms = end_ms - now_ms, end_ms - start_ms
    return FirstPeriod(end_ms, offer.price_micros * left_ms // whole_ms, (left_ms, whole_ms))


def next_period_end_ms(offer: Offer, plan: Plan, end_ms: int) -> int:
    """When the period that starts at `end_ms` (the one before's end) ends."""
    if offer.period == MONTHLY:
        return plan.next_period_start_ms(end_ms)
    return end_ms + offer.period_days * DAY_MS


def allowance_args(offer: Offer, period_end_ms: int, first: FirstPeriod | None = None
                   ) -> list[int | str]:
    """The allowances of a period ending at period_end_ms as admin/subscriptions.lua takes
    them: rating group, units (of the first period: its part), expires_at_s, priority,
    unit kind, rollover cap."""
    expires_at_s = -(-period_end_ms // 1000) + ALLOWANCE_GRACE_S
    args: list[int | str] = []
    for allowance in offer.allowances:
        units = allowance.units if first is None else first.part(allowance.units)
        args += [allowance.rating_group, units, expires_at_s, allowance.priority,
                 allowance.unit_kind.value, allowance.rollover_cap_units]
    return args
