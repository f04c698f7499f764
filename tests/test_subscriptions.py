"""Recurring offers: a subscription's first fee and allowances, its renewal at the period
end exactly once (two servers sweeping at once), what is left rolling over up to its
cap, each policy when the money is short, cancellation, a monthly offer's first period
prorated, and the plan change scheduled for the next period re-authorising the open
sessions at the boundary. The clock moves through the servers' own setting
(clock_offset_s): a server started a day ahead sees the period over. On one Redis and
on a Redis Cluster; the books after each."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from itertools import count
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, reload_catalogue, start_server, stop_server
from creditline.charging.catalogue import load_catalogue
from creditline.charging.subscriptions import ALLOWANCE_GRACE_S, DAY_MS
from creditline.errors import PlanError
from creditline.settings import Settings
from creditline.store.store import cdrs_key, partition_of
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb

from tests.books import Books
from tests.conftest import Backend
from tests.messages import RG_SMS, RG_VOICE, block, ccr
from tests.test_catalogue import CATALOGUE
from tests.test_notifications import Subscriber, subscribe

FEE = 100_000  # tests/catalogue.toml: the sms-daily offers' fee, 20 SMS a day
DAILY_SMS = 20
_numbers = count()


@contextlib.asynccontextmanager
async def serving(backend: Backend, ahead_s: int = 0, count: int = 1, **settings: Any
                  ) -> AsyncIterator[list[RunningServer]]:
    """`count` servers started at once, their clocks ahead_s ahead: each renews what is
    due as it starts, then only when the test says (sweep_once)."""
    chosen: dict[str, Any] = {
        "listen_address": "127.0.0.1:0", "plan_path": str(CATALOGUE),
        "redis_cluster": backend.cluster, "redis_call_timeout_s": 10.0,
        "clock_offset_s": ahead_s, "renewal_interval_s": 3600, "supervision_interval_s": 3600,
        **settings}
    running = await asyncio.gather(*(start_server(Settings(**chosen), backend.url)
                                     for _ in range(count)))
    try:
        yield list(running)
    finally:
        for server in running:
            await stop_server(server, grace_s=1.0)


@contextlib.asynccontextmanager
async def admin_of(running: RunningServer) -> AsyncIterator[admin_pb2_grpc.AdminStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield admin_pb2_grpc.AdminStub(channel)


async def _account(admin: admin_pb2_grpc.AdminStub, books: Books, balance: int = 1_000_000,
                   credit_limit: int = 0, plan_id: str = "") -> str:
    account_id = f"sub{os.getpid()}-{next(_numbers)}"
    await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=balance,
        credit_limit_micros=credit_limit, plan_id=plan_id))
    books.track(account_id)
    return account_id


def _subscribe(account_id: str, offer_id: str = "sms-daily") -> admin_pb.SubscribeToOfferRequest:
    return admin_pb.SubscribeToOfferRequest(account_id=account_id, offer_id=offer_id)


def _bucket(account: admin_pb.Account, bucket_id: str) -> admin_pb.Bucket | None:
    return next((b for b in account.buckets if b.bucket_id == bucket_id), None)


async def _fee_records(redis: Any, account_id: str) -> list[dict[str, str]]:
    """The account's CDRs of kind fee, in order."""
    key = cdrs_key(partition_of(account_id, Settings().partitions))
    entries = await redis.xrange(key)
    return [fields for _, fields in entries
            if fields["account"] == account_id and fields["kind"] == "fee"]


@contextlib.asynccontextmanager
async def _events(running: RunningServer, account_id: str) -> AsyncIterator[Subscriber]:
    """The account's notifications from now on."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        subscriber = await subscribe(notifications_pb2_grpc.NotificationsStub(channel),
                                     account_ids=[account_id])
        try:
            yield subscriber
        finally:
            await subscriber.close()


def _of_type(events: list[npb.ChargeEvent], kind: int) -> list[npb.ChargeEvent]:
    return [e for e in events if e.type == kind]


async def test_a_subscription_takes_its_first_fee_and_grants_its_allowances(
        backend: Backend, backend_books: Books, backend_redis: Any) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            contextlib.AsyncExitStack() as stack:
        account_id = await _account(admin, backend_books)
        events = await stack.enter_async_context(_events(running, account_id))
        subscribed = await admin.SubscribeToOffer(_subscribe(account_id))
        assert (subscribed.balance_micros, subscribed.fees_micros) == (900_000, FEE)
        (subscription,) = subscribed.subscriptions
        assert (subscription.offer_id, subscription.state, subscription.periods) == (
            "sms-daily", "active", 1)
        start, end = subscription.period_start_unix_ms, subscription.period_end_unix_ms
        assert end - start == DAY_MS  # (period_days = 1, from the subscription)
        bucket = _bucket(subscribed, "sms-daily#1")
        assert bucket is not None
        assert (bucket.rating_group, bucket.remaining_units) == (RG_SMS, DAILY_SMS)
        assert bucket.expires_at_unix_s == -(-end // 1000) + ALLOWANCE_GRACE_S
        # again: nothing changes (an active subscription is paid for its period)
        again = await admin.SubscribeToOffer(_subscribe(account_id))
        assert (again.balance_micros, again.fees_micros) == (900_000, FEE)
        (fee,) = _of_type(await events.drain(), npb.SUBSCRIBED)
        assert (fee.amount_micros, fee.balance_micros, fee.details["offer"]) == (
            FEE, 900_000, "sms-daily")
        (record,) = await _fee_records(backend_redis, account_id)
        assert (record["charged"], record["offer"], record["result"]) == (str(FEE), "sms-daily",
                                                                        "2001")
    await backend_books.assert_balanced()


async def test_refusals_change_nothing(backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        poor = await _account(admin, backend_books, balance=50_000, credit_limit=1_000_000)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # (suspend: balance alone)
            await admin.SubscribeToOffer(_subscribe(poor))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "first fee is 100000 micros, more than the 50000 available" in str(
            refused.value.details())
        cheap = await _account(admin, backend_books, plan_id="cheap")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.SubscribeToOffer(_subscribe(cheap, "voice-monthly"))
        assert "not sold with the account's plan 'cheap'" in str(refused.value.details())
        for offer_id in ("sms-10", "nothing"):  # an add-on, no offer
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.SubscribeToOffer(_subscribe(cheap, offer_id))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.CancelSubscription(admin_pb.CancelSubscriptionRequest(
                account_id=cheap, offer_id="sms-daily"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        for account_id in (poor, cheap):
            state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
            assert (state.fees_micros, list(state.subscriptions), list(state.buckets)) == (
                0, [], [])
    await backend_books.assert_balanced()


async def _use_sms(running: RunningServer, account_id: str, count: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        answer = await charging_pb2_grpc.ChargingStub(channel).Event(pb.EventRequest(
            session_id=f"{account_id};sms{count}", account_id=account_id,
            action=pb.DIRECT_DEBIT, rating_groups=[block(RG_SMS, requested=count)]))
        assert answer.result_code == pb.SUCCESS
        assert (answer.rating_groups[0].amount_micros,
                answer.rating_groups[0].units_from_buckets) == (0, count)  # (the allowance)


async def test_renewal_once_at_the_period_end_rolls_over_up_to_the_cap(
        backend: Backend, backend_books: Books, backend_redis: Any) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            contextlib.AsyncExitStack() as stack:
        account_id = await _account(admin, backend_books)
        await admin.SubscribeToOffer(_subscribe(account_id))
        await _use_sms(running, account_id, 12)  # 8 left: 5 roll over (the cap), 3 expire
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            opened = await charging_pb2_grpc.ChargingStub(channel).Initial(
                ccr(f"{account_id};call", account_id, 0, block(RG_VOICE, requested=60)))
            assert opened.result_code == pb.SUCCESS
        events = await stack.enter_async_context(_events(running, account_id))
        # a day and a minute later, two servers start at once: each renews as it starts
        async with serving(backend, ahead_s=86_460, count=2) as (one, two), \
                admin_of(one) as later:
            assert await one.renewer.sweep_once() + await two.renewer.sweep_once() == 0
            state = await later.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert (state.balance_micros, state.fees_micros) == (1_000_000 - 2 * FEE, 2 * FEE)
        (subscription,) = state.subscriptions
        assert (subscription.state, subscription.periods) == ("active", 2)
        assert subscription.period_end_unix_ms - subscription.period_start_unix_ms == DAY_MS
        bucket = _bucket(state, "sms-daily#1")
        assert bucket is not None and bucket.remaining_units == DAILY_SMS + 5
        seen = await events.drain()
        (renewal,) = _of_type(seen, npb.RENEWED)
        assert (renewal.amount_micros, renewal.details["period"]) == (FEE, "2")
        (expired,) = _of_type(seen, npb.BUCKET_EXPIRED)
        assert expired.units == 3
        asked = _of_type(seen, npb.REAUTHORIZATION_NEEDED)
        assert [(e.session_id, e.rating_group) for e in asked] == [
            (f"{account_id};call", str(RG_VOICE))]
    assert [r["charged"] for r in await _fee_records(backend_redis, account_id)] == [str(FEE)] * 2
    await backend_books.assert_balanced()


@pytest.mark.parametrize(("offer_id", "credit_limit", "state", "balance", "account_state"), [
    ("sms-daily", 1_000_000, "suspended", 50_000, admin_pb.ACTIVE),
    ("sms-daily-bar", 0, "suspended", 50_000, admin_pb.BARRED),
    ("sms-daily-credit", 60_000, "active", -50_000, admin_pb.ACTIVE),
    ("sms-daily-credit", 40_000, "suspended", 50_000, admin_pb.ACTIVE),
])
async def test_a_renewal_the_money_cannot_pay_applies_the_offers_policy(
        backend: Backend, backend_books: Books, backend_redis: Any, offer_id: str,
        credit_limit: int, state: str, balance: int, account_state: int) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            contextlib.AsyncExitStack() as stack:
        account_id = await _account(admin, backend_books, balance=150_000,
                                    credit_limit=credit_limit)
        await admin.SubscribeToOffer(_subscribe(account_id, offer_id))  # 50,000 left
        events = await stack.enter_async_context(_events(running, account_id))
        async with serving(backend, ahead_s=86_460) as (later,), admin_of(later) as admin:
            after = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
            (subscription,) = after.subscriptions
            assert (subscription.state, after.balance_micros, after.state) == (
                state, balance, account_state)
            bucket = _bucket(after, f"{offer_id}#1")
            seen = await events.drain()
            records = await _fee_records(backend_redis, account_id)
            if state == "active":
                assert bucket is not None and bucket.remaining_units == DAILY_SMS
                assert len(_of_type(seen, npb.RENEWED)) == 1
                assert records[-1]["charged"] == str(FEE)
            else:  # no fee, no allowance: announced, and a CDR of nothing charged, 4012
                assert bucket is None
                (failed,) = _of_type(seen, npb.RENEWAL_FAILED)
                available = 50_000 + (credit_limit if offer_id == "sms-daily-credit" else 0)
                assert (failed.amount_micros, failed.details["available"]) == (
                    FEE, str(available))
                assert (records[-1]["charged"], records[-1]["result"]) == ("0", "4012")
            if state == "suspended":  # topped up, it is paid again from now
                await admin.TopUp(admin_pb.TopUpRequest(account_id=account_id,
                                                        amount_micros=FEE, top_up_id="t1"))
                again = await admin.SubscribeToOffer(_subscribe(account_id, offer_id))
                assert (again.subscriptions[0].state, again.subscriptions[0].periods) == (
                    "active", 2)
                assert again.balance_micros == 50_000
    await backend_books.assert_balanced()


async def test_a_cancelled_subscription_ends_with_its_period_or_at_once(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        later, now = await _account(admin, backend_books), await _account(admin, backend_books)
        for account_id in (later, now):
            await admin.SubscribeToOffer(_subscribe(account_id))
        cancelled = await admin.CancelSubscription(admin_pb.CancelSubscriptionRequest(
            account_id=later, offer_id="sms-daily"))
        assert cancelled.subscriptions[0].state == "cancelling"
        assert _bucket(cancelled, "sms-daily#1") is not None  # (paid until the period ends)
        gone = await admin.CancelSubscription(admin_pb.CancelSubscriptionRequest(
            account_id=now, offer_id="sms-daily", immediately=True))
        assert (list(gone.subscriptions), list(gone.buckets)) == ([], [])
    async with serving(backend, ahead_s=86_460) as (running,), admin_of(running) as admin:
        ended = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=later))
        assert (list(ended.subscriptions), list(ended.buckets), ended.fees_micros) == (
            [], [], FEE)
    await backend_books.assert_balanced()


async def test_a_monthly_offer_prorates_its_first_period_to_the_billing_day(
        backend: Backend, backend_books: Books) -> None:
    plan = load_catalogue(CATALOGUE).plans["standard"]
    async with serving(backend) as (running,), admin_of(running) as admin:
        account_id = await _account(admin, backend_books, balance=10_000_000)
        subscribed = await admin.SubscribeToOffer(_subscribe(account_id, "voice-monthly"))
    (subscription,) = subscribed.subscriptions
    start, end = subscription.period_start_unix_ms, subscription.period_end_unix_ms
    assert end == plan.next_period_start_ms(start)
    whole = end - plan.period_start_ms(start)
    assert subscribed.fees_micros == 3_000_000 * (end - start) // whole
    bucket = _bucket(subscribed, "voice-monthly#1")
    assert bucket is not None and bucket.remaining_units == 6_000 * (end - start) // whole
    # at the billing day it renews for the whole month, whole fee
    ahead_s = (end - start) // 1000 + 60
    async with serving(backend, ahead_s=ahead_s) as (running,), admin_of(running) as admin:
        renewed = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    (subscription,) = renewed.subscriptions
    assert subscription.period_end_unix_ms == plan.next_period_start_ms(end)
    assert renewed.fees_micros == subscribed.fees_micros + 3_000_000
    bucket = _bucket(renewed, "voice-monthly#1")
    assert bucket is not None and bucket.remaining_units == 6_000  # (no rollover)
    await backend_books.assert_balanced()


async def test_a_plan_change_from_the_next_period_re_authorises_the_sessions_then(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            contextlib.AsyncExitStack() as stack:
        account_id = await _account(admin, backend_books)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await charging_pb2_grpc.ChargingStub(channel).Initial(
                ccr(f"{account_id};call", account_id, 0, block(RG_VOICE, requested=60)))
        scheduled = await admin.ChangePlan(admin_pb.ChangePlanRequest(
            account_id=account_id, plan_id="cheap", from_next_period=True))
        ahead_s = (scheduled.next_plan_from_unix_ms - running.store.clock.now_ms()) // 1000
        events = await stack.enter_async_context(_events(running, account_id))
        async with serving(backend, ahead_s=ahead_s + 60) as (later,), \
                admin_of(later) as admin:
            asked = _of_type(await events.drain(), npb.REAUTHORIZATION_NEEDED)
            assert [(e.session_id, e.rating_group) for e in asked] == [
                (f"{account_id};call", str(RG_VOICE))]
            changed = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
            assert (changed.plan_id, changed.next_plan_id) == ("cheap", "")
            await later.renewer.sweep_once()  # (once: nothing more for this account)
            assert _of_type(await events.drain(), npb.REAUTHORIZATION_NEEDED) == []
    await backend_books.assert_balanced()


async def test_a_reload_that_drops_a_subscribed_offer_is_refused(
        backend: Backend, backend_books: Books, tmp_path: Any) -> None:
    path = tmp_path / "catalogue.toml"
    path.write_text(CATALOGUE.read_text())
    async with serving(backend, plan_path=str(path)) as (running,), \
            admin_of(running) as admin:
        account_id = await _account(admin, backend_books)
        await admin.SubscribeToOffer(_subscribe(account_id, "sms-daily-bar"))
        path.write_text(CATALOGUE.read_text().replace('"sms-daily-bar"', '"sms-daily-ban"'))
        with pytest.raises(PlanError) as refused:
            await reload_catalogue(running, Settings().partitions)
        assert "offer 'sms-daily-bar' by " in str(refused.value)
        assert running.catalogue.offers["sms-daily-bar"].recurring
