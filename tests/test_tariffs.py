"""Bands and tiers through the real server: usage priced by the band it was used in, across
the Updates of a session, and tiers counting the usage of the billing period across
sessions and events (tests/plan.toml: rating groups 101 and 11)."""

from __future__ import annotations

import datetime as dt

from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_PEAK_VOICE, RG_TIERED_DATA, block, ccr, granted, rg_answer

KIB = 1024


def utc_ms(year: int, month: int, day: int, hour: int, minute: int) -> int:
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()) * 1000


def at(request: pb.CreditControlRequest, event_time_unix_ms: int) -> pb.CreditControlRequest:
    request.event_time_unix_ms = event_time_unix_ms
    return request


async def test_a_call_across_the_end_of_peak_is_charged_by_the_band_of_each_second(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    sid = f"{acct};late-call"
    rg = RG_PEAK_VOICE

    # 19:58: 60 s granted in peak: the first second 30, 59 more at 30
    answer = await charging.Initial(at(ccr(sid, acct, 0, block(rg, requested=60)),
                                       utc_ms(2026, 11, 30, 19, 58)))
    assert granted(answer, rg) == 60
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.reserved_micros == 60 * 30

    # 19:59: the first minute used, all in peak
    answer = await charging.Update(at(ccr(sid, acct, 1, block(rg, requested=120, used=60)),
                                      utc_ms(2026, 11, 30, 19, 59)))
    assert rg_answer(answer, rg).charged_micros == 60 * 30

    # 20:01: two minutes reported; the first was used in peak, the second off-peak
    answer = await charging.Update(at(ccr(sid, acct, 2, block(rg, requested=60, used=120)),
                                      utc_ms(2026, 11, 30, 20, 1)))
    assert rg_answer(answer, rg).charged_micros == 60 * 30 + 60 * 10
    # what is granted now is off-peak
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.reserved_micros == 60 * 10

    answer = await charging.Terminate(at(ccr(sid, acct, 3, block(rg, used=60)),
                                         utc_ms(2026, 11, 30, 20, 2)))
    assert rg_answer(answer, rg).charged_micros == 60 * 10
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.balance_micros == 1_000_000 - (120 * 30 + 120 * 10)
    assert state.reserved_micros == 0


async def debit(charging, acct: str, name: str, octets: int,  # type: ignore[no-untyped-def]
                event_time_unix_ms: int, action: int = pb.DIRECT_DEBIT) -> pb.EventAnswer:
    answer = await charging.Event(pb.EventRequest(
        session_id=f"{acct};{name}", account_id=acct, action=action,
        event_time_unix_ms=event_time_unix_ms,
        rating_groups=[block(RG_TIERED_DATA, requested=octets)]))
    assert answer.result_code == pb.SUCCESS, answer
    return answer


async def test_tiers_count_the_usage_of_the_billing_period_across_sessions_and_events(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000_000)
    rg = RG_TIERED_DATA
    november = utc_ms(2026, 11, 20, 12, 0)

    first = await debit(charging, acct, "e1", 768 * KIB, november)
    assert first.rating_groups[0].amount_micros == 768 * 1_000

    # a session of 512 KiB crosses the 1 MiB tier: 256 KiB at 1,000, 256 at 500
    sid = f"{acct};s1"
    await charging.Initial(at(ccr(sid, acct, 0, block(rg, requested=512 * KIB)), november))
    answer = await charging.Terminate(at(ccr(sid, acct, 1, block(rg, used=512 * KIB)),
                                         november + 60_000))
    assert rg_answer(answer, rg).charged_micros == 256 * 1_000 + 256 * 500

    # beyond the tier the following increments cost 500 (tiers price the following
    # increments; each usage's first increment keeps the tariff's first price)
    price = await debit(charging, acct, "p1", 4 * KIB, november, action=pb.PRICE_ENQUIRY)
    assert price.rating_groups[0].amount_micros == 1_000 + 3 * 500
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    usage = next(u for u in state.usage if u.rating_group == rg)
    assert (usage.billing_period, usage.period_units) == ("2026-11-01", 1280 * KIB)

    # December is a new billing period: the first tier's price again
    december = await debit(charging, acct, "e2", 4 * KIB, utc_ms(2026, 12, 1, 0, 30))
    assert december.rating_groups[0].amount_micros == 4 * 1_000
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    usage = next(u for u in state.usage if u.rating_group == rg)
    assert (usage.billing_period, usage.period_units) == ("2026-12-01", 4 * KIB)
    assert state.balance_micros == 10_000_000 - (1024 * 1_000 + 256 * 500 + 4 * 1_000)


async def test_units_from_buckets_do_not_move_the_tier(
        charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    bucket = admin_pb.Bucket(bucket_id="gift", rating_group=RG_TIERED_DATA,
                             initial_units=2048 * KIB, unit_kind=admin_pb.VOLUME)
    acct = await make_account(balance_micros=10_000_000, buckets=[bucket])
    november = utc_ms(2026, 11, 20, 12, 0)
    from_bucket = await debit(charging, acct, "e1", 2048 * KIB, november)
    assert from_bucket.rating_groups[0].units_from_buckets == 2048 * KIB
    assert from_bucket.rating_groups[0].amount_micros == 0
    paid = await debit(charging, acct, "e2", 4 * KIB, november)
    assert paid.rating_groups[0].amount_micros == 4 * 1_000  # still below the tier
