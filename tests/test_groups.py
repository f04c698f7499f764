"""Shared balances: a group's members ("<group id>/<member>") draw on the group's money and
buckets, each within its own limit per billing period; 50 members charging at once over
unary calls and Charging.Stream never take more than the group has nor more than a
member's limit; a group's top-up re-authorises its members' sessions held at final units;
barring the group bars its members; what a member may not do itself is refused with
nothing changed. On one Redis and on a Redis Cluster; the books after each (the session's
reconcile checks the one-Redis accounts again at the end of the run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from itertools import count
from typing import Any

import grpc
import pytest
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb

from tests.books import Books
from tests.conftest import Backend
from tests.messages import RG_SMS, RG_VOICE, block, ccr, granted
from tests.stream_client import charging_over
from tests.test_subscriptions import _events, _of_type, admin_of, serving

VOICE_PER_S = 10_000  # tests/catalogue.toml, plan standard
SMS_EACH = 50_000
_numbers = count()


def _group_id() -> str:
    return f"grp{os.getpid()}-{next(_numbers)}"


async def _group(admin: admin_pb2_grpc.AdminStub, books: Books, balance: int,
                 members: dict[str, int | None]) -> tuple[str, list[str]]:
    """A group with `balance` and its members (name -> limit per period, None: none)."""
    group_id = _group_id()
    await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=group_id, initial_balance_micros=balance))
    books.track(group_id)
    member_ids = []
    for name, limit in members.items():
        member_id = f"{group_id}/{name}"
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=member_id, has_member_limit=limit is not None,
            member_limit_micros=limit or 0))
        books.track(member_id)
        member_ids.append(member_id)
    return group_id, member_ids


def _voice(session_id: str, account_id: str, number: int, requested: int | None = None,
           used: int | None = None) -> pb.CreditControlRequest:
    return ccr(session_id, account_id, number, block(RG_VOICE, requested=requested, used=used))


async def test_members_draw_on_the_groups_money_within_their_limits(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            charging_over(channel, "unary") as charging:
        group_id, (alice, bob) = await _group(admin, backend_books, 1_000_000,
                                              {"alice": 300_000, "bob": None})
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert list(group.member_ids) == [alice, bob]
        # alice asks for 60 s: her limit buys 30
        answer = await charging.Initial(_voice(f"{alice};1", alice, 0, requested=60))
        assert granted(answer, RG_VOICE) == 30
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=alice))
        assert (seen.group_id, seen.balance_micros, seen.reserved_micros,
                seen.available_micros, seen.member_limit_micros) == (
            group_id, 1_000_000, 300_000, 0, 300_000)
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert (group.reserved_micros, group.available_micros) == (300_000, 700_000)
        # bob, with no limit, sends two SMS on the group's money
        debit = await charging.Event(pb.EventRequest(
            session_id=f"{bob};sms", account_id=bob, action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_SMS, requested=2)]))
        assert (debit.result_code, debit.balance_micros) == (pb.SUCCESS, 900_000)
        await charging.Terminate(_voice(f"{alice};1", alice, 1, used=30))
        # alice spent her limit: refused, the group's money left for the others
        again = await charging.Initial(_voice(f"{alice};2", alice, 0, requested=60))
        assert again.result_code == pb.CREDIT_LIMIT_REACHED
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=alice))
        assert (seen.charged_micros, seen.member_spent_micros, seen.available_micros) == (
            300_000, 300_000, 0)
        assert seen.member_billing_period  # (the plan's, named by its first day)
        # a higher limit: 20 s more
        raised = await admin.SetMemberLimit(admin_pb.SetMemberLimitRequest(
            account_id=alice, has_limit=True, limit_micros=500_000))
        assert raised.available_micros == 200_000
        answer = await charging.Initial(_voice(f"{alice};3", alice, 0, requested=60))
        assert granted(answer, RG_VOICE) == 20
        await charging.Terminate(_voice(f"{alice};3", alice, 1, used=20))
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert (group.balance_micros, group.charged_micros, group.reserved_micros) == (
            400_000, 600_000, 0)
        bob_seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=bob))
        assert (bob_seen.charged_micros, bob_seen.has_member_limit) == (2 * SMS_EACH, False)
        (usage,) = bob_seen.usage
        assert (usage.rating_group, usage.used_units) == (RG_SMS, 2)
    await backend_books.assert_balanced()


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_fifty_members_at_once_never_exceed_the_groups_money_or_their_limits(
        backend: Backend, backend_books: Books, transport: str) -> None:
    members = 50
    limit = 400_000          # 50 x 400,000 is twice the group's money: both bind
    money = 10_000_000
    async with serving(backend) as (running,), admin_of(running) as admin, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            charging_over(channel, transport) as charging:
        limits: dict[str, int | None] = {f"m{n}": limit if n % 2 else None
                                         for n in range(members)}
        group_id, member_ids = await _group(admin, backend_books, money, limits)

        async def talk(member_id: str) -> int:
            """Calls of 7 s until refused; the units it was granted and used."""
            total = 0
            for call in count():
                session_id = f"{member_id};{call}"
                answer = await charging.Initial(_voice(session_id, member_id, 0, requested=7))
                if answer.result_code != pb.SUCCESS:
                    assert answer.result_code == pb.CREDIT_LIMIT_REACHED, answer
                    return total
                units = granted(answer, RG_VOICE)
                total += units
                closed = await charging.Terminate(_voice(session_id, member_id, 1, used=units))
                assert closed.result_code == pb.SUCCESS, closed
            raise AssertionError("unreachable")

        used = await asyncio.gather(*(talk(m) for m in member_ids))
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert (group.balance_micros, group.charged_micros, group.reserved_micros) == (
            0, money, 0)
        assert sum(used) * VOICE_PER_S == money
        for member_id, units in zip(member_ids, used, strict=True):
            seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=member_id))
            assert seen.charged_micros == units * VOICE_PER_S
            if seen.has_member_limit:
                assert seen.member_spent_micros == seen.charged_micros <= limit
    await backend_books.assert_balanced()


async def test_a_groups_top_up_reauthorises_its_members_and_barring_it_bars_them(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            charging_over(channel, "unary") as charging, contextlib.AsyncExitStack() as stack:
        group_id, (carol,) = await _group(admin, backend_books, 200_000, {"carol": None})
        events = await stack.enter_async_context(_events(running, carol))
        answer = await charging.Initial(_voice(f"{carol};call", carol, 0, requested=60))
        assert granted(answer, RG_VOICE) == 20  # the group's last money: final units
        assert answer.rating_groups[0].HasField("final_unit_indication")
        await admin.TopUp(admin_pb.TopUpRequest(account_id=group_id, amount_micros=500_000,
                                                top_up_id=f"{group_id}-1"))
        asked = _of_type(await events.drain(), npb.REAUTHORIZATION_NEEDED)
        assert [(e.account_id, e.session_id, e.rating_group) for e in asked] == [
            (carol, f"{carol};call", str(RG_VOICE))]
        await charging.Terminate(_voice(f"{carol};call", carol, 1, used=20))
        await admin.SetAccountState(admin_pb.SetAccountStateRequest(
            account_id=group_id, state=admin_pb.BARRED))
        barred = await charging.Initial(_voice(f"{carol};2", carol, 0, requested=10))
        assert barred.result_code == pb.END_USER_SERVICE_DENIED
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=carol))
        assert seen.state == admin_pb.BARRED
    await backend_books.assert_balanced()


async def test_members_draw_on_the_groups_buckets(backend: Backend,
                                                   backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            charging_over(channel, "unary") as charging:
        group_id, (dave,) = await _group(admin, backend_books, 1_000_000, {"dave": 60_000})
        await admin.AddBucket(admin_pb.AddBucketRequest(account_id=group_id, bucket=admin_pb.Bucket(
            bucket_id="family-sms", rating_group=RG_SMS, initial_units=5,
            unit_kind=admin_pb.SERVICE_SPECIFIC)))
        # 6 SMS: 5 from the group's bucket, 1 paid within dave's limit
        debit = await charging.Event(pb.EventRequest(
            session_id=f"{dave};sms", account_id=dave, action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_SMS, requested=6)]))
        assert debit.result_code == pb.SUCCESS
        assert debit.balance_micros == 1_000_000 - SMS_EACH
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=dave))
        assert [(b.bucket_id, b.remaining_units) for b in seen.buckets] == [("family-sms", 0)]
        # the limit left (10,000) buys no SMS: refused, nothing charged
        short = await charging.Event(pb.EventRequest(
            session_id=f"{dave};sms2", account_id=dave, action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_SMS, requested=1)]))
        assert short.result_code == pb.CREDIT_LIMIT_REACHED
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert group.balance_micros == 1_000_000 - SMS_EACH
    await backend_books.assert_balanced()


async def _refused(call: Any, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == code, refused.value.details()
    assert words in (refused.value.details() or ""), refused.value.details()


async def test_what_a_member_may_not_do_is_refused_with_nothing_changed(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin:
        group_id, (erin,) = await _group(admin, backend_books, 1_000_000, {"erin": None})
        precondition, invalid = grpc.StatusCode.FAILED_PRECONDITION, \
            grpc.StatusCode.INVALID_ARGUMENT
        await _refused(admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=f"{_group_id()}/frank")), precondition, "group does not exist")
        await _refused(admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=f"{group_id}/gina", initial_balance_micros=5)), invalid,
            "initial_balance_micros: a member of group")
        await _refused(admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=_group_id(), has_member_limit=True, member_limit_micros=5)), invalid,
            "has_member_limit")
        await _refused(admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=f"{group_id}/a/b")), invalid, "one /")
        await _refused(admin.TopUp(admin_pb.TopUpRequest(
            account_id=erin, amount_micros=10, top_up_id="t1")), precondition,
            f"member of group {group_id!r}")
        await _refused(admin.BuyAddOn(admin_pb.BuyAddOnRequest(
            account_id=erin, offer_id="sms-10", purchase_id="p1")), precondition,
            "member of group")
        await _refused(admin.SetMemberLimit(admin_pb.SetMemberLimitRequest(
            account_id=group_id, has_limit=True, limit_micros=5)), precondition,
            "no group's member")
        await _refused(admin.SetMemberLimit(admin_pb.SetMemberLimitRequest(
            account_id=erin, has_limit=True, limit_micros=-1)), invalid, "limit_micros")
        group = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=group_id))
        assert (group.balance_micros, group.purchased_micros, list(group.member_ids)) == (
            1_000_000, 0, [erin])
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=erin))
        assert (seen.has_member_limit, list(seen.buckets)) == (False, [])
    await backend_books.assert_balanced()


async def test_a_members_session_closed_by_supervision_keeps_its_spending_counted(
        backend: Backend, backend_books: Books) -> None:
    async with serving(backend) as (running,), admin_of(running) as admin, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel, \
            charging_over(channel, "unary") as charging:
        _, (hana,) = await _group(admin, backend_books, 1_000_000, {"hana": 200_000})
        await charging.Initial(_voice(f"{hana};1", hana, 0, requested=15))
        await charging.Terminate(_voice(f"{hana};1", hana, 1, used=15))
        answer = await charging.Initial(_voice(f"{hana};2", hana, 0, requested=60))
        assert granted(answer, RG_VOICE) == 5
        # the gateway goes silent: supervision closes the session (its deadline passed)
        later_ms = running.store.clock.now_ms() + 86_400_000
        assert await running.store.close_if_stale(hana, f"{hana};2", later_ms)
        seen = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=hana))
        assert (seen.reserved_micros, seen.member_spent_micros, seen.available_micros) == (
            0, 150_000, 50_000)
        again = await charging.Initial(_voice(f"{hana};3", hana, 0, requested=60))
        assert granted(again, RG_VOICE) == 5
        await charging.Terminate(_voice(f"{hana};3", hana, 1, used=5))
    await backend_books.assert_balanced()
