"""Money rules an operator relies on (issue 15): stored answers that decode on their own,
bucket reservations that belong to their bucket, grants that end with their bucket,
refunds bounded by the charge they name, adjustments, top-up ids, refused debits, the
event-time window and the rules the README's table states. Through the real server,
unary and Stream (the `charging` fixture), with the books checked after each test."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from creditline.api.app import start_server, stop_server
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.store.store import (
    BUCKET_FIELDS,
    StoredBucket,
    account_keys,
    claim_key,
    parse_bucket,
)
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio import Redis

from tests.books import Books
from tests.messages import RG_FREE, RG_SMS, RG_VOICE, RG_WEB, block, ccr, granted, rg_answer
from tests.stream_client import StreamCharging
from tests.test_notifications import subscribe


def sms_event(sid: str, acct: str, action: int, *blocks: pb.RatingGroupRequest,
              refund_of: str = "") -> pb.EventRequest:
    return pb.EventRequest(session_id=sid, account_id=acct, action=action,
                           rating_groups=list(blocks), refund_of_session_id=refund_of)


async def account(admin, acct: str) -> admin_pb.Account:  # type: ignore[no-untyped-def]
    state: admin_pb.Account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    return state


# ------------------------------------------------------------------ stored answers

async def test_an_event_with_a_free_rating_group_is_answered_and_retransmitted_identically(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    debit = sms_event(f"{acct};e", acct, pb.DIRECT_DEBIT, block(RG_FREE, requested=60),
                      block(RG_SMS, requested=1))
    answer = await charging.Event(debit)
    assert answer.result_code == pb.SUCCESS, answer
    free, sms = answer.rating_groups
    assert (free.rating_group, free.result_code, free.units.time_s, free.amount_micros) == (
        RG_FREE, pb.CREDIT_CONTROL_NOT_APPLICABLE, 60, 0)
    assert (sms.result_code, sms.units.service_specific_units, sms.amount_micros) == (
        pb.SUCCESS, 1, 50_000)
    assert answer.balance_micros == 950_000
    first = answer.SerializeToString()
    assert (await charging.Event(debit)).SerializeToString() == first
    # a retransmission carrying other blocks still gets the stored answer, byte for byte
    other = sms_event(debit.session_id, acct, pb.DIRECT_DEBIT, block(RG_SMS, requested=7))
    assert (await charging.Event(other)).SerializeToString() == first
    assert (await account(admin, acct)).balance_micros == 950_000


async def test_a_session_answer_retransmitted_with_other_blocks_is_the_stored_one(
        charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    initial = ccr(f"{acct};s", acct, 0, block(RG_WEB, requested=2_048), block(RG_FREE))
    first = (await charging.Initial(initial)).SerializeToString()
    other = ccr(f"{acct};s", acct, 0, block(RG_VOICE, requested=60, service_id=3))
    assert (await charging.Initial(other)).SerializeToString() == first


async def test_a_refused_debit_reports_nothing_charged(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=120_000)
    answer = await charging.Event(sms_event(f"{acct};e", acct, pb.DIRECT_DEBIT,
                                            block(RG_SMS, requested=3)))
    (sms,) = answer.rating_groups
    assert (answer.result_code, sms.result_code) == (pb.CREDIT_LIMIT_REACHED,
                                                     pb.CREDIT_LIMIT_REACHED)
    assert (sms.amount_micros, sms.units_from_buckets) == (0, 0)
    # a balance check still says what the units would cost
    check = await charging.Event(sms_event(f"{acct};c", acct, pb.CHECK_BALANCE,
                                           block(RG_SMS, requested=3)))
    assert check.rating_groups[0].amount_micros == 150_000 and not check.sufficient
    assert (await account(admin, acct)).balance_micros == 120_000


# ------------------------------------------------------------------ buckets

def voice_bucket(bucket_id: str, units: int, expires_at_unix_s: int = 0) -> admin_pb.Bucket:
    return admin_pb.Bucket(bucket_id=bucket_id, rating_group=RG_VOICE, unit_kind=admin_pb.TIME,
                           initial_units=units, expires_at_unix_s=expires_at_unix_s)


async def test_an_expired_buckets_reservation_does_not_block_a_new_bucket(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    expires = int(time.time()) + 2
    acct = await make_account(balance_micros=5_000_000, buckets=[voice_bucket("b1", 1000, expires)])
    s1 = await charging.Initial(ccr(f"{acct};s1", acct, 0, block(RG_VOICE, requested=120)))
    assert granted(s1, RG_VOICE) == 120
    state = await account(admin, acct)
    assert state.reserved_micros == 0 and state.buckets[0].reserved_units == 120
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.1)
    # the expired bucket is not listed, though no charging request touched the account
    assert [b.bucket_id for b in (await account(admin, acct)).buckets] == []
    await admin.AddBucket(admin_pb.AddBucketRequest(account_id=acct,
                                                    bucket=voice_bucket("b2", 100)))
    s2 = await charging.Initial(ccr(f"{acct};s2", acct, 0, block(RG_VOICE, requested=60)))
    assert granted(s2, RG_VOICE) == 60
    state = await account(admin, acct)
    assert state.reserved_micros == 0  # from the bucket, not from money
    assert [(b.bucket_id, b.reserved_units) for b in state.buckets] == [("b2", 60)]
    end = await charging.Terminate(ccr(f"{acct};s2", acct, 1, block(RG_VOICE, used=60)))
    assert rg_answer(end, RG_VOICE).charged_micros == 0
    state = await account(admin, acct)
    assert state.balance_micros == 5_000_000 and state.buckets[0].remaining_units == 40
    # S1's 120 s: the 40 s left in b2 first, then money for 80 s (0.10 + 0.60 + 20 x 0.01)
    end = await charging.Terminate(ccr(f"{acct};s1", acct, 1, block(RG_VOICE, used=120)))
    assert rg_answer(end, RG_VOICE).charged_micros == 100_000 + 600_000 + 20 * 10_000
    assert (await account(admin, acct)).buckets[0].remaining_units == 0


async def test_the_scripts_write_buckets_as_store_bucket_fields_says(
        charging, redis, settings, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=0, buckets=[voice_bucket("b", 300, 0)])
    keys = account_keys(acct, settings.partitions)
    created = parse_bucket(await redis.hget(keys.buckets, "b"))  # written by admin.lua
    assert (created.rating_group, created.remaining, created.initial, created.unit_kind,
            created.reserved) == (RG_VOICE, 300, 300, "time", 0)
    await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_VOICE, requested=120)))
    held = parse_bucket(await redis.hget(keys.buckets, "b"))  # written by charge.lua
    assert (held.serial, held.remaining, held.reserved) == (created.serial, 300, 120)
    await charging.Terminate(ccr(f"{acct};s", acct, 1, block(RG_VOICE, used=100)))
    used = parse_bucket(await redis.hget(keys.buckets, "b"))
    assert (used.remaining, used.reserved) == (200, 0)
    assert [f.name for f in dataclasses.fields(StoredBucket)] == list(BUCKET_FIELDS)


async def test_a_grant_from_a_bucket_ends_no_later_than_the_bucket(
        charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    soon = int(time.time()) + 3
    acct = await make_account(balance_micros=5_000_000, buckets=[voice_bucket("soon", 1000, soon)])
    answer = await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_VOICE, requested=120)))
    assert 1 <= rg_answer(answer, RG_VOICE).validity_time_s <= 3
    await charging.Terminate(ccr(f"{acct};s", acct, 1, block(RG_VOICE, used=1)))
    # from money or from a bucket that never expires: the plan's validity time
    other = await make_account(balance_micros=5_000_000, buckets=[voice_bucket("never", 1000)])
    answer = await charging.Initial(ccr(f"{other};s", other, 0, block(RG_VOICE, requested=120)))
    assert rg_answer(answer, RG_VOICE).validity_time_s == 1800
    answer = await charging.Initial(ccr(f"{acct};m", acct, 0, block(RG_WEB, requested=2_048)))
    assert rg_answer(answer, RG_WEB).validity_time_s == 1800


# ------------------------------------------------------------------ refunds

async def voice_call(charging, acct: str, sid: str, used_s: int) -> None:  # type: ignore[no-untyped-def]
    await charging.Initial(ccr(sid, acct, 0, block(RG_VOICE, requested=used_s)))
    await charging.Terminate(ccr(sid, acct, 1, block(RG_VOICE, used=used_s)))


async def refund(charging, acct: str, sid: str, of: str, units: int,  # type: ignore[no-untyped-def]
                 rating_group: int = RG_VOICE) -> pb.EventAnswer:
    answer: pb.EventAnswer = await charging.Event(sms_event(
        sid, acct, pb.REFUND, block(rating_group, requested=units), refund_of=of))
    return answer


async def test_a_refund_must_name_a_charge_and_cannot_create_money(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000_000)
    missing = await charging.Event(sms_event(f"{acct};r0", acct, pb.REFUND,
                                             block(RG_VOICE, requested=600)))
    assert missing.result_code == pb.MISSING_AVP
    assert missing.error_message.startswith("refund_of_session_id")
    unknown = await refund(charging, acct, f"{acct};r1", f"{acct};nothing", 600)
    assert unknown.result_code == pb.INVALID_AVP_VALUE
    assert unknown.error_message.startswith("refund_of_session_id")
    misplaced = await charging.Event(sms_event(f"{acct};d", acct, pb.DIRECT_DEBIT,
                                               block(RG_SMS, requested=1), refund_of="x"))
    assert misplaced.result_code == pb.INVALID_AVP_VALUE
    state = await account(admin, acct)
    assert (state.balance_micros, state.refunded_micros) == (10_000_000, 0)
    assert all(u.charged_micros >= 0 for u in state.usage)


async def test_a_session_refund_is_bounded_by_what_the_session_charged(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000_000)
    call = f"{acct};call"
    await voice_call(charging, acct, call, 600)  # 0.10 + 0.60 + 540 x 0.01 = 6.10
    assert (await account(admin, acct)).balance_micros == 10_000_000 - 6_100_000
    too_many = await refund(charging, acct, f"{acct};r1", call, 601)
    assert too_many.result_code == pb.INVALID_AVP_VALUE
    assert too_many.error_message.startswith("rating_groups[0].requested")
    # the last 30 s: the price of the call's last 30 s
    part = await refund(charging, acct, f"{acct};r2", call, 30)
    assert (part.result_code, part.rating_groups[0].amount_micros) == (pb.SUCCESS, 300_000)
    assert (await refund(charging, acct, f"{acct};r2", call, 30)) == part  # retransmission
    rest = await refund(charging, acct, f"{acct};r3", call, 570)
    assert rest.rating_groups[0].amount_micros == 6_100_000 - 300_000
    assert rest.balance_micros == 10_000_000
    again = await refund(charging, acct, f"{acct};r4", call, 1)
    assert again.result_code == pb.INVALID_AVP_VALUE
    state = await account(admin, acct)
    assert (state.balance_micros, state.charged_micros, state.refunded_micros) == (
        10_000_000, 6_100_000, 6_100_000)
    voice = next(u for u in state.usage if u.rating_group == RG_VOICE)
    assert voice.charged_micros == 0  # charged, then refunded whole


async def test_an_event_refund_is_bounded_by_the_event(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    debit = sms_event(f"{acct};sms", acct, pb.DIRECT_DEBIT, block(RG_SMS, requested=3))
    await charging.Event(debit)
    one = await refund(charging, acct, f"{acct};r1", debit.session_id, 1, RG_SMS)
    assert one.rating_groups[0].amount_micros == 50_000
    two = await refund(charging, acct, f"{acct};r2", debit.session_id, 2, RG_SMS)
    assert two.rating_groups[0].amount_micros == 100_000 and two.balance_micros == 1_000_000
    more = await refund(charging, acct, f"{acct};r3", debit.session_id, 1, RG_SMS)
    assert more.result_code == pb.INVALID_AVP_VALUE
    of_a_refund = await refund(charging, acct, f"{acct};r5", f"{acct};r1", 1, RG_SMS)
    assert of_a_refund.result_code == pb.INVALID_AVP_VALUE  # a refund is no charge
    of_itself = await refund(charging, acct, f"{acct};r6", f"{acct};r6", 1, RG_SMS)
    assert of_itself.result_code == pb.INVALID_AVP_VALUE
    assert of_itself.error_message.startswith("refund_of_session_id")
    other_rg = await refund(charging, acct, f"{acct};r4", debit.session_id, 1, RG_VOICE)
    assert other_rg.result_code == pb.INVALID_AVP_VALUE
    assert other_rg.error_message.startswith("rating_groups[0]")
    # units paid from buckets are not money to give back
    gift = admin_pb.Bucket(bucket_id="gift", rating_group=RG_SMS, initial_units=5,
                           unit_kind=admin_pb.SERVICE_SPECIFIC)
    with_bucket = await make_account(balance_micros=1_000_000, buckets=[gift])
    free_sms = sms_event(f"{with_bucket};sms", with_bucket, pb.DIRECT_DEBIT,
                         block(RG_SMS, requested=2))
    assert (await charging.Event(free_sms)).rating_groups[0].units_from_buckets == 2
    nothing = await refund(charging, with_bucket, f"{with_bucket};r", free_sms.session_id, 1,
                           RG_SMS)
    assert nothing.result_code == pb.INVALID_AVP_VALUE
    assert (await account(admin, with_bucket)).balance_micros == 1_000_000


# ------------------------------------------------------------------ adjustments, top-ups

async def test_an_adjustment_is_recorded_announced_and_idempotent(
        admin, notifications, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    subscriber = await subscribe(notifications, account_ids=[acct],
                                 event_types=[npb.ADJUSTMENT])
    credit = admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=250_000,
                                           adjustment_id="care-1", reason="dropped call")
    state = await admin.AdjustBalance(credit)
    assert (state.balance_micros, state.adjusted_micros) == (1_250_000, 250_000)
    assert (await admin.AdjustBalance(credit)).balance_micros == 1_250_000  # applied once
    (event,) = await subscriber.read(1)
    assert (event.amount_micros, event.balance_micros) == (250_000, 1_250_000)
    assert event.details["reason"] == "dropped call"
    assert event.details["adjustment_id"] == "care-1"
    await subscriber.no_more()
    subscriber.cancel()
    debit = admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=-100_000,
                                          adjustment_id="care-2", reason="correction")
    assert (await admin.AdjustBalance(debit)).balance_micros == 1_150_000
    for request, code, words in [
        (admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=1, adjustment_id="care-1",
                                       reason="x"), grpc.StatusCode.ALREADY_EXISTS,
         ["adjustment_id", "care-1", "250000"]),
        (admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=-2_000_000,
                                       adjustment_id="care-3", reason="x"),
         grpc.StatusCode.FAILED_PRECONDITION, ["1150000"]),
        (admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=5,
                                       adjustment_id="care-4"),
         grpc.StatusCode.INVALID_ARGUMENT, ["reason"]),
        (admin_pb.AdjustBalanceRequest(account_id=acct, amount_micros=0,
                                       adjustment_id="care-5", reason="x"),
         grpc.StatusCode.INVALID_ARGUMENT, ["amount_micros"]),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.AdjustBalance(request)
        assert refused.value.code() == code
        assert all(word in (refused.value.details() or "") for word in words), refused.value
    assert (await account(admin, acct)).balance_micros == 1_150_000


async def test_a_top_up_id_reused_with_another_amount_is_refused(
        admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=0)
    first = admin_pb.TopUpRequest(account_id=acct, amount_micros=1_000_000, top_up_id="t1")
    await admin.TopUp(first)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=2_000_000,
                                                top_up_id="t1"))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "top_up_id" in (refused.value.details() or "")
    assert "'t1'" in (refused.value.details() or "")
    assert "1000000" in (refused.value.details() or "")
    state = await admin.TopUp(first)  # the same top-up again: applied once, answered OK
    assert (state.balance_micros, state.topped_up_micros) == (1_000_000, 1_000_000)


# ------------------------------------------------------------------ the rules table

async def test_a_delayed_duplicate_of_an_earlier_request_gets_5004(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=5_000_000)
    sid = f"{acct};s"
    await charging.Initial(ccr(sid, acct, 0, block(RG_VOICE, requested=120)))
    first = ccr(sid, acct, 1, block(RG_VOICE, requested=120, used=60))
    await charging.Update(first)
    await charging.Update(ccr(sid, acct, 2, block(RG_VOICE, requested=120, used=60)))
    balance = (await account(admin, acct)).balance_micros
    late = await charging.Update(first)  # #1 again, after #2: only the last answer is kept
    assert late.result_code == pb.INVALID_AVP_VALUE
    assert (await account(admin, acct)).balance_micros == balance


async def test_zero_seconds_used_cost_nothing(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=5_000_000)
    await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_VOICE, requested=120)))
    end = await charging.Terminate(ccr(f"{acct};s", acct, 1, block(RG_VOICE, used=0)))
    assert rg_answer(end, RG_VOICE).charged_micros == 0  # no connect fee either
    assert (await account(admin, acct)).balance_micros == 5_000_000


async def test_reauthorization_names_the_rating_groups_held_at_final_units(
        charging, admin, notifications, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=4_096)  # 4 KiB of web: the first grant is final
    sid = f"{acct};s"
    answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                                        block(RG_VOICE, requested=0)))
    assert rg_answer(answer, RG_WEB).final_unit_indication.action == pb.REDIRECT
    subscriber = await subscribe(notifications, account_ids=[acct],
                                 event_types=[npb.REAUTHORIZATION_NEEDED])
    await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=1_000_000,
                                            top_up_id="t"))
    (event,) = await subscriber.read(1)
    assert (event.session_id, event.rating_group) == (sid, str(RG_WEB))
    await subscriber.no_more()
    subscriber.cancel()
    await charging.Terminate(ccr(sid, acct, 1, block(RG_WEB, used=1_024)))


# ------------------------------------------------------------------ the event-time window

@pytest.fixture(scope="module")
async def default_window_channel(redis_process: RedisProcess, settings: Settings
                                 ) -> AsyncIterator[grpc.aio.Channel]:
    """A server with the default event-time window (the shared one accepts old dates)."""
    running = await start_server(Settings(listen_address="127.0.0.1:0",
                                          plan_path=settings.plan_path), redis_process.url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield channel
    await stop_server(running, grace_s=1.0)


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_event_times_outside_the_window_are_refused_naming_the_field(
        transport: str, default_window_channel: grpc.aio.Channel, make_account: Any,
        admin: Any, checked_books: Any) -> None:
    stub: Any = charging_pb2_grpc.ChargingStub(default_window_channel)
    if transport == "stream":
        stub = StreamCharging(stub)
    acct = await make_account(balance_micros=1_000_000)
    now_ms = int(time.time() * 1000)
    defaults = Settings()
    year_10000_ms = 253_402_300_800_000
    refused = [-1, 1, now_ms - (defaults.max_event_age_s + 60) * 1000,
               now_ms + (defaults.max_event_ahead_s + 60) * 1000, year_10000_ms, 2**63 - 1]
    for n, event_time_ms in enumerate(refused):
        debit = sms_event(f"{acct};e{n}", acct, pb.DIRECT_DEBIT, block(RG_SMS, requested=1))
        debit.event_time_unix_ms = event_time_ms
        answer = await stub.Event(debit)
        assert answer.result_code == pb.INVALID_AVP_VALUE, event_time_ms
        assert answer.error_message.startswith("event_time_unix_ms"), answer
        initial = ccr(f"{acct};s{n}", acct, 0, block(RG_SMS, requested=1))
        initial.event_time_unix_ms = event_time_ms
        answer = await stub.Initial(initial)
        assert answer.result_code == pb.INVALID_AVP_VALUE, event_time_ms
        assert answer.error_message.startswith("event_time_unix_ms"), answer
    assert (await account(admin, acct)).balance_micros == 1_000_000
    late = sms_event(f"{acct};late", acct, pb.DIRECT_DEBIT, block(RG_SMS, requested=1))
    late.event_time_unix_ms = now_ms - 3 * 3600 * 1000  # hours late: accepted
    assert (await stub.Event(late)).result_code == pb.SUCCESS
    if transport == "stream":
        await stub.close()


async def test_the_cli_adjusts_a_balance_with_a_reason(
        server: Any, admin: Any, make_account: Any, checked_books: Any) -> None:
    acct = await make_account(balance_micros=1_000_000)
    command = [sys.executable, "-m", "creditline", "account", "--server",
               f"127.0.0.1:{server.port}", "adjust", acct, "-200000", "--reason",
               "double charge on 2026-12-01", "--adjustment-id", "care-7"]
    for _ in range(2):  # the same adjustment id twice: applied once
        finished = await asyncio.to_thread(subprocess.run, command, capture_output=True,
                                           text=True, timeout=60, check=False)
        assert finished.returncode == 0, finished.stderr
    state = await account(admin, acct)
    assert (state.balance_micros, state.adjusted_micros) == (800_000, -200_000)
    without_reason = await asyncio.to_thread(subprocess.run, command[:-4], capture_output=True,
                                             text=True, timeout=60, check=False)
    assert without_reason.returncode != 0 and "--reason" in without_reason.stderr


async def test_a_terminate_without_rating_groups_closes_the_session(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=5_000_000)
    await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_VOICE, requested=120)))
    assert (await account(admin, acct)).reserved_micros > 0
    end = await charging.Terminate(ccr(f"{acct};s", acct, 1))
    assert (end.result_code, list(end.rating_groups)) == (pb.SUCCESS, [])
    state = await account(admin, acct)
    assert (state.reserved_micros, state.open_sessions, state.balance_micros) == (0, 0, 5_000_000)
    assert await charging.Terminate(ccr(f"{acct};s", acct, 1)) == end  # retransmission


async def test_without_session_id_claims_one_id_opens_on_two_accounts(
        settings: Settings) -> None:
    with RedisProcess() as own_redis:  # its own: no other server's calls in the count
        running = await start_server(Settings(listen_address="127.0.0.1:0",
                                              plan_path=settings.plan_path,
                                              session_id_claims=False), own_redis.url)
        redis = Redis.from_url(own_redis.url, decode_responses=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                await _one_id_on_two_accounts(channel, redis, settings.partitions)
        finally:
            await redis.aclose()
            await stop_server(running, grace_s=1.0)


async def _one_id_on_two_accounts(channel: grpc.aio.Channel, redis: Redis,
                                  partitions: int) -> None:
    admin = admin_pb2_grpc.AdminStub(channel)
    stub = charging_pb2_grpc.ChargingStub(channel)
    books = Books(redis, partitions)
    for acct in ("first", "second"):
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=acct, initial_balance_micros=1_000_000))
        books.track(acct)
    # the first call may load the script (NOSCRIPT, SCRIPT LOAD, EVALSHA again): before counting
    await stub.Event(sms_event("warm", "first", pb.PRICE_ENQUIRY, block(RG_SMS, requested=1)))
    calls = await _script_calls(redis)
    for acct in ("first", "second"):  # the network vouches for its ids: not checked
        answer = await stub.Initial(ccr("unclaimed", acct, 0, block(RG_SMS, requested=1)))
        assert answer.result_code == pb.SUCCESS
        await stub.Terminate(ccr("unclaimed", acct, 1, block(RG_SMS, used=1)))
    assert await _script_calls(redis) - calls == 4  # one script call each
    assert await redis.exists(claim_key("unclaimed", partitions)) == 0
    await books.assert_balanced()


async def _script_calls(redis: Any) -> int:
    """FCALLs and EVALSHAs (the charging script's, and the claims' and admin's)."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("evalsha", "fcall"))
