"""Session charging scenarios through the real server: Initial / Update / Terminate."""

from __future__ import annotations

import time

from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import (
    RG_FREE,
    RG_UNRATED,
    RG_VIDEO,
    RG_VOICE,
    RG_WEB,
    block,
    ccr,
    granted,
    rg_answer,
)


async def account(admin, account_id):  # type: ignore[no-untyped-def]
    return await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))


def usage(acct: admin_pb.Account, rating_group: int) -> admin_pb.RatingGroupUsage:
    return next(u for u in acct.usage if u.rating_group == rating_group)


async def test_initial_update_terminate_with_two_rating_groups(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=100_000_000)
    sid = f"{acct};s1"

    answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                                        block(RG_VOICE, requested=300)))
    assert answer.result_code == pb.SUCCESS
    assert granted(answer, RG_WEB) == 10_240
    assert granted(answer, RG_VOICE) == 300
    voice = rg_answer(answer, RG_VOICE)
    assert voice.validity_time_s == 1800 and voice.quota_holding_time_s == 300
    assert voice.time_quota_threshold_s == 60  # 20 % of 300 s
    assert rg_answer(answer, RG_WEB).volume_quota_threshold_octets == 2048
    assert not voice.HasField("final_unit_indication")
    # web: 10 KiB x 1_000; voice: 100_000 connect + 600_000 first minute + 240 s x 10_000
    assert (await account(admin, acct)).reserved_micros == 10_000 + 3_100_000

    answer = await charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=10_240, used=5_000),
                                       block(RG_VOICE, requested=300, used=90)))
    assert answer.result_code == pb.SUCCESS
    assert rg_answer(answer, RG_WEB).charged_micros == 5_000         # 5 KiB started
    assert rg_answer(answer, RG_VOICE).charged_micros == 1_000_000   # 100k + 600k + 30 x 10k

    answer = await charging.Terminate(ccr(sid, acct, 2, block(RG_WEB, used=3_000),
                                          block(RG_VOICE, used=30)))
    assert answer.result_code == pb.SUCCESS
    # cumulative rounding: 8_000 octets are 8 KiB in all, 5 of them already paid
    assert rg_answer(answer, RG_WEB).charged_micros == 3_000
    assert rg_answer(answer, RG_VOICE).charged_micros == 300_000

    after = await account(admin, acct)
    assert after.balance_micros == 100_000_000 - 1_308_000
    assert after.reserved_micros == 0 and after.open_sessions == 0
    assert usage(after, RG_WEB).used_units == 8_000
    assert usage(after, RG_WEB).charged_micros == 8_000
    assert usage(after, RG_VOICE).used_units == 120
    assert usage(after, RG_VOICE).charged_micros == 1_300_000


async def test_exhaustion_gives_final_units_then_credit_limit_reached(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=35_000)  # 35 KiB of web
    sid = f"{acct};s"
    answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=20_480)))
    assert granted(answer, RG_WEB) == 20_480
    assert not rg_answer(answer, RG_WEB).HasField("final_unit_indication")

    answer = await charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=20_480, used=20_480)))
    web = rg_answer(answer, RG_WEB)
    assert web.result_code == pb.SUCCESS
    assert granted(answer, RG_WEB) == 15_360  # what the 15_000 left can buy
    assert web.final_unit_indication.action == pb.REDIRECT
    assert web.final_unit_indication.redirect_address == "https://top-up.example.net/"

    answer = await charging.Update(ccr(sid, acct, 2, block(RG_WEB, requested=20_480, used=15_360)))
    assert answer.result_code == pb.CREDIT_LIMIT_REACHED
    assert rg_answer(answer, RG_WEB).result_code == pb.CREDIT_LIMIT_REACHED
    assert granted(answer, RG_WEB) == 0
    assert rg_answer(answer, RG_WEB).charged_micros == 15_000

    answer = await charging.Terminate(ccr(sid, acct, 3, block(RG_WEB, used=0)))
    assert answer.result_code == pb.SUCCESS
    after = await account(admin, acct)
    assert after.balance_micros == 0 and after.reserved_micros == 0


async def test_final_grant_exactly_exhausting_the_balance_is_final(
        charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000)
    answer = await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_WEB, requested=10_240)))
    web = rg_answer(answer, RG_WEB)
    assert granted(answer, RG_WEB) == 10_240
    assert web.final_unit_indication.action == pb.REDIRECT


async def test_usage_above_grant_is_charged_up_to_credit_limit_and_recorded(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    for credit_limit, charged, balance in ((0, 10_000, 0), (5_000, 15_000, -5_000)):
        acct = await make_account(balance_micros=10_000, credit_limit_micros=credit_limit)
        sid = f"{acct};s"
        answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=4_096)))
        assert granted(answer, RG_WEB) == 4_096
        answer = await charging.Terminate(ccr(sid, acct, 1, block(RG_WEB, used=20_480)))
        assert rg_answer(answer, RG_WEB).charged_micros == charged
        after = await account(admin, acct)
        assert after.balance_micros == balance
        web = usage(after, RG_WEB)
        assert web.used_units == 20_480                  # always recorded
        assert web.charged_micros == charged
        assert web.uncharged_micros == 20_000 - charged  # what the limit could not pay


async def test_buckets_are_used_before_money_and_expired_ones_are_ignored(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    buckets = [
        admin_pb.Bucket(bucket_id="expired", rating_group=RG_WEB, unit_kind=admin_pb.VOLUME,
                        initial_units=1_048_576, expires_at_unix_s=int(time.time()) - 10),
        admin_pb.Bucket(bucket_id="later", rating_group=RG_WEB, unit_kind=admin_pb.VOLUME,
                        initial_units=4_000, priority=2),
        admin_pb.Bucket(bucket_id="first", rating_group=RG_WEB, unit_kind=admin_pb.VOLUME,
                        initial_units=6_240, priority=1,
                        expires_at_unix_s=int(time.time()) + 3600),
    ]
    acct = await make_account(balance_micros=1_000_000, buckets=buckets)
    sid = f"{acct};s"
    answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=20_480)))
    assert granted(answer, RG_WEB) == 20_480
    # 10_240 units from the live buckets, 10 KiB of money
    assert (await account(admin, acct)).reserved_micros == 10_000

    answer = await charging.Update(ccr(sid, acct, 1, block(RG_WEB, used=15_000)))
    # buckets cover 10_240; 4_760 octets of money are 5 started KiB
    assert rg_answer(answer, RG_WEB).charged_micros == 5_000
    await charging.Terminate(ccr(sid, acct, 2))
    after = await account(admin, acct)
    assert after.balance_micros == 995_000
    remaining = {b.bucket_id: b.remaining_units for b in after.buckets}
    assert remaining == {"first": 0, "later": 0}  # the expired one is gone
    assert usage(after, RG_WEB).units_from_buckets == 10_240


async def test_one_rating_group_out_of_credit_does_not_stop_the_others(
        charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    video_bucket = admin_pb.Bucket(bucket_id="video", rating_group=RG_VIDEO,
                                   unit_kind=admin_pb.VOLUME, initial_units=5_000_000)
    acct = await make_account(balance_micros=0, buckets=[video_bucket])
    answer = await charging.Initial(ccr(
        f"{acct};s", acct, 0, block(RG_WEB, requested=10_240),
        block(RG_VIDEO, requested=1_000_000), block(RG_FREE, requested=60),
        block(RG_UNRATED, requested=60)))
    assert answer.result_code == pb.SUCCESS
    assert rg_answer(answer, RG_WEB).result_code == pb.CREDIT_LIMIT_REACHED
    assert granted(answer, RG_VIDEO) == 1_000_000
    assert rg_answer(answer, RG_FREE).result_code == pb.CREDIT_CONTROL_NOT_APPLICABLE
    assert rg_answer(answer, RG_UNRATED).result_code == pb.RATING_FAILED


async def test_retransmissions_get_the_same_answer_and_charge_once(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    sid = f"{acct};s"
    first = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240)))
    again = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240)))
    assert again == first
    assert (await account(admin, acct)).reserved_micros == 10_000

    update = ccr(sid, acct, 1, block(RG_WEB, requested=10_240, used=10_240))
    first = await charging.Update(update)
    assert await charging.Update(update) == first
    assert (await account(admin, acct)).balance_micros == 990_000

    second = await charging.Update(ccr(sid, acct, 2, block(RG_WEB, requested=1_024, used=1_024)))
    assert second.result_code == pb.SUCCESS
    stale = await charging.Update(update)  # number 1 after 2: out of order
    assert stale.result_code == pb.INVALID_AVP_VALUE
    assert "request number" in stale.error_message

    terminate = ccr(sid, acct, 3, block(RG_WEB, used=1_024))
    first = await charging.Terminate(terminate)
    assert await charging.Terminate(terminate) == first
    after = await account(admin, acct)
    assert after.balance_micros == 1_000_000 - 12_000
    assert after.reserved_micros == 0
    assert (await charging.Update(ccr(sid, acct, 4, block(RG_WEB, used=1)))).result_code == (
        pb.UNKNOWN_SESSION_ID)


async def test_unknown_session_account_and_barred_account(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    answer = await charging.Update(ccr("no-such-session", acct, 1, block(RG_WEB, used=100)))
    assert answer.result_code == pb.UNKNOWN_SESSION_ID
    answer = await charging.Terminate(ccr("no-such-session", acct, 1, block(RG_WEB, used=100)))
    assert answer.result_code == pb.UNKNOWN_SESSION_ID
    answer = await charging.Initial(ccr("s", "nobody", 0, block(RG_WEB, requested=100)))
    assert answer.result_code == pb.USER_UNKNOWN

    sid = f"{acct};s"
    await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240)))
    await admin.SetAccountState(admin_pb.SetAccountStateRequest(account_id=acct,
                                                                state=admin_pb.BARRED))
    answer = await charging.Initial(ccr(f"{acct};other", acct, 0, block(RG_WEB, requested=1)))
    assert answer.result_code == pb.END_USER_SERVICE_DENIED
    # a barred account still pays for what was used, but gets no more quota
    answer = await charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=1_024, used=2_048)))
    assert rg_answer(answer, RG_WEB).result_code == pb.END_USER_SERVICE_DENIED
    assert rg_answer(answer, RG_WEB).charged_micros == 2_000
    await charging.Terminate(ccr(sid, acct, 2))
    assert (await account(admin, acct)).balance_micros == 998_000
