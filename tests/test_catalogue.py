"""The catalogue: many price plans in one file, accounts on plans, a request priced by its
account's plan in one round trip (the script names the account's plan when the server
assumed another), a plan change during a session. Two real servers on one Redis: what
one process remembers of an account's plan, the other changes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from itertools import count
from pathlib import Path
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, reload_catalogue, start_server, stop_server
from creditline.charging.catalogue import load_catalogue
from creditline.errors import PlanError
from creditline.settings import Settings
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from tests.books import Books
from tests.conftest import Backend
from tests.messages import RG_SMS, RG_VOICE, block, ccr, rg_answer
from tests.stream_client import charging_over
from tests.test_notifications import subscribe

CATALOGUE = Path(__file__).parent / "catalogue.toml"
SMS_PRICE = {"standard": 50_000, "cheap": 10_000}      # tests/catalogue.toml
VOICE_PRICE_PER_S = {"standard": 10_000, "cheap": 2_000}
_numbers = count()


@pytest.fixture(scope="module")
async def servers(backend: Backend) -> AsyncIterator[list[RunningServer]]:
    """Two servers on the catalogue and the same Redis (two processes of one deployment)."""
    settings = Settings(listen_address="127.0.0.1:0", plan_path=str(CATALOGUE),
                        redis_cluster=backend.cluster, redis_call_timeout_s=10.0)
    running = [await start_server(settings, backend.url) for _ in range(2)]
    yield running
    for server in running:
        await stop_server(server, grace_s=1.0)


@pytest.fixture
def redis(backend_redis: Redis | ClusterClient) -> Redis | ClusterClient:
    return backend_redis


@pytest.fixture
def books(backend_books: Books) -> Books:
    return backend_books


@pytest.fixture(scope="module")
async def channels(servers: list[RunningServer]) -> AsyncIterator[list[grpc.aio.Channel]]:
    opened = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for server in servers]
    yield opened
    for channel in opened:
        await channel.close()


@pytest.fixture(params=["unary", "stream"])
async def charging(request: pytest.FixtureRequest, channels: list[grpc.aio.Channel]
                   ) -> AsyncIterator[Any]:
    """The first server's Charging service, unary or through Charging.Stream."""
    async with charging_over(channels[0], request.param) as charging:
        yield charging


def _admin(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


async def _account(admin: admin_pb2_grpc.AdminStub, books: Books, plan_id: str = ""
                   ) -> str:
    account_id = f"cat{os.getpid()}-{next(_numbers)}"
    created = await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=10_000_000, plan_id=plan_id))
    assert created.plan_id == (plan_id or "standard")
    books.track(account_id)
    return account_id


async def _fcalls(redis: Redis | ClusterClient) -> int:
    """The charging script's calls so far, on every node of a cluster."""
    if isinstance(redis, ClusterClient):
        by_node = await redis.info("commandstats", target_nodes=ClusterClient.ALL_NODES)
        return sum(int(stats.get("cmdstat_fcall", {}).get("calls", 0))
                   for stats in by_node.values())
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_fcall", {}).get("calls", 0))


def _sms(account_id: str, number: int = 0) -> pb.EventRequest:
    return pb.EventRequest(session_id=f"{account_id};sms{number}", account_id=account_id,
                           action=pb.DIRECT_DEBIT,
                           rating_groups=[block(RG_SMS, requested=1)])


async def test_each_account_is_priced_by_its_plan_in_one_round_trip(
        charging: Any, channels: list[grpc.aio.Channel], redis: Redis | ClusterClient,
        books: Books) -> None:
    admin = _admin(channels[0])
    on_plan = {plan_id: await _account(admin, books, plan_id) for plan_id in SMS_PRICE}
    for plan_id, account_id in on_plan.items():
        answer = await charging.Event(_sms(account_id))
        assert answer.result_code == pb.SUCCESS
        assert answer.rating_groups[0].amount_micros == SMS_PRICE[plan_id]
        # the server now knows the plan: the next request is one script call
        before = await _fcalls(redis)
        answer = await charging.Event(_sms(account_id, 1))
        assert answer.rating_groups[0].amount_micros == SMS_PRICE[plan_id]
        assert await _fcalls(redis) - before == 1
        session_id = f"{account_id};call"
        await charging.Initial(ccr(session_id, account_id, 0, block(RG_VOICE, requested=60)))
        end = await charging.Terminate(ccr(session_id, account_id, 1, block(RG_VOICE, used=30)))
        assert rg_answer(end, RG_VOICE).charged_micros == 30 * VOICE_PRICE_PER_S[plan_id]
        state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert state.plan_id == plan_id
        assert state.balance_micros == (10_000_000 - 2 * SMS_PRICE[plan_id]
                                        - 30 * VOICE_PRICE_PER_S[plan_id])
    await books.assert_balanced()


async def test_a_plan_changed_elsewhere_prices_the_session_from_its_next_request(
        channels: list[grpc.aio.Channel], books: Books) -> None:
    """The first server knows the account on "standard"; the second moves it to "cheap".
    The first server's next Update is priced by "cheap" (the script names it, the server
    prices the request again), and the session is asked to re-authorise."""
    charging = charging_pb2_grpc.ChargingStub(channels[0])
    admin_elsewhere = _admin(channels[1])
    account_id = await _account(_admin(channels[0]), books)
    session_id = f"{account_id};call"
    await charging.Initial(ccr(session_id, account_id, 0, block(RG_VOICE, requested=60)))
    reauthorizations = await subscribe(
        notifications_pb2_grpc.NotificationsStub(channels[1]), account_ids=[account_id],
        event_types=[npb.REAUTHORIZATION_NEEDED, npb.PLAN_CHANGED])
    changed = await admin_elsewhere.ChangePlan(admin_pb.ChangePlanRequest(
        account_id=account_id, plan_id="cheap"))
    assert changed.plan_id == "cheap"
    events = await reauthorizations.read(2)
    assert [e.type for e in events] == [npb.PLAN_CHANGED, npb.REAUTHORIZATION_NEEDED]
    assert dict(events[0].details) == {"plan": "cheap", "from": "standard"}
    assert (events[1].session_id, events[1].rating_group) == (session_id, str(RG_VOICE))
    reauthorizations.cancel()
    # used before the change was reserved at the old price; the plan in force when the
    # request is applied prices it (README, Catalogue)
    update = await charging.Update(ccr(session_id, account_id, 1,
                                       block(RG_VOICE, used=20, requested=60)))
    assert rg_answer(update, RG_VOICE).charged_micros == 20 * VOICE_PRICE_PER_S["cheap"]
    end = await charging.Terminate(ccr(session_id, account_id, 2, block(RG_VOICE, used=10)))
    assert rg_answer(end, RG_VOICE).charged_micros == 10 * VOICE_PRICE_PER_S["cheap"]
    await books.assert_balanced()


async def test_a_plan_change_from_the_next_period_takes_over_at_its_boundary(
        servers: list[RunningServer], channels: list[grpc.aio.Channel],
        redis: Redis | ClusterClient, books: Books) -> None:
    admin = _admin(channels[0])
    charging = charging_pb2_grpc.ChargingStub(channels[0])
    account_id = await _account(admin, books)
    scheduled = await admin.ChangePlan(admin_pb.ChangePlanRequest(
        account_id=account_id, plan_id="cheap", from_next_period=True))
    # tests/catalogue.toml's "standard": billing day 1, UTC
    today = dt.datetime.now(dt.UTC).date()
    boundary = dt.datetime(today.year + today.month // 12, today.month % 12 + 1, 1,
                           tzinfo=dt.UTC)
    assert (scheduled.plan_id, scheduled.next_plan_id) == ("standard", "cheap")
    assert scheduled.next_plan_from_unix_ms == int(boundary.timestamp() * 1000)
    answer = await charging.Event(_sms(account_id))
    assert answer.rating_groups[0].amount_micros == SMS_PRICE["standard"]  # not yet
    # the boundary passes (the account's own record of it, moved to a second ago)
    key = servers[0].store.keys(account_id).account
    await redis.hset(key, "next_plan_from_ms", str(int(time.time() * 1000) - 1_000))
    answer = await charging.Event(_sms(account_id, 1))
    assert answer.rating_groups[0].amount_micros == SMS_PRICE["cheap"]
    assert await redis.hmget(key, "plan", "next_plan") == ["cheap", None]  # made the plan
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    assert (state.plan_id, state.next_plan_id) == ("cheap", "")
    await books.assert_balanced()


async def test_a_reload_is_refused_while_accounts_use_a_plan_it_drops(
        backend: Backend, tmp_path: Path, books: Books) -> None:
    """reload_catalogue, what SIGHUP runs (tests/test_catalogue_reload.py: the signal), on
    this backend: the accounts using a plan are found in every partition."""
    path = tmp_path / "catalogue.toml"
    path.write_text(CATALOGUE.read_text())
    settings = Settings(listen_address="127.0.0.1:0", plan_path=str(path),
                        redis_cluster=backend.cluster, redis_call_timeout_s=10.0)
    running = await start_server(settings, backend.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            admin = _admin(channel)
            for _ in range(3):
                await _account(admin, books, "cheap")
            path.write_text(CATALOGUE.read_text().replace('"cheap"', '"thrifty"'))
            with pytest.raises(PlanError) as refused:
                await reload_catalogue(running, settings.partitions)
            assert "it drops what is still in use: plan 'cheap' by " in str(refused.value)
            used = int(str(refused.value).split("'cheap' by ")[1].split(" ")[0])
            assert used >= 3  # (and those of the module's other tests on this Redis)
            # an account made before plans (no plan of its own) follows the default: a
            # reload that changes the default is refused while there is one
            older = await _account(admin, books)
            await running.redis.hdel(running.store.keys(older).account, "plan")
            path.write_text(CATALOGUE.read_text().replace('default_plan = "standard"',
                                                          'default_plan = "cheap"'))
            with pytest.raises(PlanError) as refused:
                await reload_catalogue(running, settings.partitions)
            assert "plan 'standard' (the default) by " in str(refused.value)
            await running.redis.hset(running.store.keys(older).account, "plan", "standard")
            path.write_text(CATALOGUE.read_text() + '\n[[plan]]\nid = "gold"\n'
                            '[[plan.tariff]]\nrating_group = 1\nunit = "time"\nfree = true\n')
            assert "catalogue reloaded" in await reload_catalogue(running, settings.partitions)
            listed = await admin.ListPlans(admin_pb.ListPlansRequest())
            assert [p.plan_id for p in listed.plans] == ["standard", "cheap", "gold"]
            await _account(admin, books, "gold")
    finally:
        await stop_server(running, grace_s=1.0)
    await books.assert_balanced()


async def test_plans_are_listed_and_unknown_ones_refused(
        channels: list[grpc.aio.Channel], books: Books) -> None:
    admin = _admin(channels[0])
    listed = await admin.ListPlans(admin_pb.ListPlansRequest())
    assert [p.plan_id for p in listed.plans] == ["standard", "cheap"]
    assert listed.default_plan_id == "standard"
    assert listed.catalogue_version == load_catalogue(CATALOGUE).version
    assert list(listed.plans[0].rating_groups) == [RG_VOICE, RG_SMS]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=f"cat{os.getpid()}-x", plan_id="gold"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "plan_id: 'gold' is not a plan of the catalogue" in str(refused.value.details())
    account_id = await _account(admin, books)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.ChangePlan(admin_pb.ChangePlanRequest(account_id=account_id,
                                                          plan_id="gold"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_an_account_on_a_plan_this_server_does_not_have_is_refused_unapplied(
        servers: list[RunningServer], channels: list[grpc.aio.Channel],
        redis: Redis | ClusterClient, books: Books) -> None:
    """A catalogue being rolled out: the account is on a plan this process has not loaded.
    The request is refused with 5012 (retry) and nothing is charged."""
    account_id = await _account(_admin(channels[0]), books)
    await redis.hset(servers[0].store.keys(account_id).account, "plan", "next-year")
    answer = await charging_pb2_grpc.ChargingStub(channels[0]).Event(_sms(account_id))
    assert answer.result_code == pb.UNABLE_TO_COMPLY
    assert "'next-year' is not in this server's catalogue" in answer.error_message
    state = await _admin(channels[0]).GetAccount(admin_pb.GetAccountRequest(
        account_id=account_id))
    assert state.balance_micros == 10_000_000 and state.charged_micros == 0
    await books.assert_balanced()


def _buy(account_id: str, offer_id: str, purchase_id: str) -> admin_pb.BuyAddOnRequest:
    return admin_pb.BuyAddOnRequest(account_id=account_id, offer_id=offer_id,
                                    purchase_id=purchase_id)


async def test_an_add_on_is_paid_once_and_its_units_are_used_before_money(
        charging: Any, channels: list[grpc.aio.Channel], books: Books) -> None:
    admin = _admin(channels[0])
    account_id = await _account(admin, books)
    subscriber = await subscribe(notifications_pb2_grpc.NotificationsStub(channels[0]),
                                 account_ids=[account_id], event_types=[npb.PURCHASE])
    bought = await admin.BuyAddOn(_buy(account_id, "sms-10", "p-1"))
    assert (bought.balance_micros, bought.purchased_micros) == (9_800_000, 200_000)
    (bucket,) = bought.buckets
    assert (bucket.bucket_id, bucket.rating_group, bucket.remaining_units) == ("p-1.1",
                                                                               RG_SMS, 10)
    assert abs(bucket.expires_at_unix_s - (time.time() + 86_400)) < 60
    (event,) = await subscriber.read(1)
    assert (event.amount_micros, event.balance_micros) == (200_000, 9_800_000)
    assert dict(event.details) == {"offer": "sms-10", "purchase_id": "p-1"}
    subscriber.cancel()
    # a retransmission (and ten at once) changes nothing: the same purchase
    again = await asyncio.gather(*(admin.BuyAddOn(_buy(account_id, "sms-10", "p-1"))
                                   for _ in range(10)))
    assert {a.balance_micros for a in again} == {9_800_000}
    answer = await charging.Event(_sms(account_id))
    assert answer.rating_groups[0].amount_micros == 0  # from the add-on's bucket
    assert answer.rating_groups[0].units_from_buckets == 1
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.BuyAddOn(_buy(account_id, "voice-hour", "p-1"))
    assert refused.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert "'p-1' bought offer 'sms-10'" in str(refused.value.details())
    await books.assert_balanced()


async def test_an_add_on_the_account_cannot_have_is_refused_with_nothing_changed(
        channels: list[grpc.aio.Channel], books: Books) -> None:
    admin = _admin(channels[0])
    account_id = await _account(admin, books)  # on "standard": no voice-hour
    for offer_id, purchase_id, code, reason in [
            ("voice-hour", "p-2", grpc.StatusCode.FAILED_PRECONDITION,
             "not sold with the account's plan 'standard'"),
            ("gold", "p-3", grpc.StatusCode.INVALID_ARGUMENT, "not an offer of the catalogue"),
            ("sms-10", "p 4", grpc.StatusCode.INVALID_ARGUMENT, "purchase_id: letters")]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.BuyAddOn(_buy(account_id, offer_id, purchase_id))
        assert refused.value.code() is code
        assert reason in str(refused.value.details())
    await admin.AdjustBalance(admin_pb.AdjustBalanceRequest(
        account_id=account_id, amount_micros=-9_900_000, adjustment_id="a", reason="test"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:  # 0.10 left: the add-on is 0.20
        await admin.BuyAddOn(_buy(account_id, "sms-10", "p-5"))
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "costs 200000 micros, more than the 100000 available" in str(
        refused.value.details())
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    assert (state.balance_micros, state.purchased_micros, len(state.buckets)) == (100_000, 0, 0)
    await books.assert_balanced()


PLAN_A = '[[plan]]\nid = "a"\n[[plan.tariff]]\nrating_group = 1\nunit = "time"\nfree = true\n'
ALLOWANCE = '[[offer.allowance]]\nrating_group = 1\nunit = "time"\nunits = 5\n'


@pytest.mark.parametrize(("text", "reason"), [
    ('[[plan]]\nid = "a"\n', "plan[0].tariff: at least one [[tariff]] table is required"),
    ('[[plan]]\nid = "a b"\n[[plan.tariff]]\n', "plan[0].id: ' ' is not allowed"),
    ('[[plan]]\nid = "a"\nname = "A"\n', "plan[0].name: a catalogue's plan is named by its id"),
    ('[catalogue]\ndefault_plan = "b"\n[[plan]]\nid = "a"\n[[plan.tariff]]\n'
     'rating_group = 1\nunit = "time"\nfree = true\n',
     "catalogue.default_plan: 'b' is not a plan of the catalogue (a)"),
    ('[[plan]]\nid = "a"\n[[plan.tariff]]\nrating_group = 1\nunit = "time"\nfree = true\n'
     '[[plan]]\nid = "a"\n[[plan.tariff]]\nrating_group = 1\nunit = "time"\nfree = true\n',
     "plan[1].id: 'a' is the id of an earlier plan too"),
    ('[[plan]]\nid = "a"\nbilling_day = 40\n[[plan.tariff]]\nrating_group = 1\n'
     'unit = "time"\nfree = true\n', "plan[0].billing_day:"),
    ('[[plan]]\nid = "a"\n[[plan.tariff]]\nrating_group = 1\nunit = "minutes"\n',
     "plan[0].tariff[0].unit: 'minutes' is not one of"),
    ('[[bundle]]\nid = "x"\n', "bundle: unknown table"),
    (PLAN_A + '[[offer]]\nid = "x"\nkind = "bundle"\n',
     "offer[0].kind: 'bundle' is not one of add_on, recurring"),
    (PLAN_A + '[[offer]]\nid = "x"\nkind = "recurring"\nfee_micros = 1\n' + ALLOWANCE,
     "offer[0].period: required, 'monthly' (from the account's billing day) or "
     "period_days = 1..366"),
    (PLAN_A + '[[offer]]\nid = "x"\nkind = "recurring"\nfee_micros = 1\nperiod = "monthly"\n'
     'period_days = 7\n' + ALLOWANCE, "not both"),
    (PLAN_A + '[[offer]]\nid = "x"\nkind = "recurring"\nfee_micros = 1\nperiod = "monthly"\n'
     'on_short_balance = "beg"\n' + ALLOWANCE,
     "offer[0].on_short_balance: 'beg' is not one of suspend, bar, credit_limit"),
    (PLAN_A + '[[offer]]\nid = "x"\nkind = "recurring"\nvalidity_s = 60\n',
     "offer[0].validity_s: unknown field"),
    (PLAN_A + '[[offer]]\nid = "x"\nprice_micros = 1\nvalidity_s = 60\n' + ALLOWANCE
     + 'rollover_cap_units = 5\n',
     "offer[0].allowance[0].rollover_cap_units: unknown field"),
    (PLAN_A + '[[offer]]\nid = "x"\nprice_micros = 1\nvalidity_s = 60\nplans = ["b"]\n',
     "offer[0].plans: a list of the catalogue's plan ids (a)"),
    (PLAN_A + '[[offer]]\nid = "x"\nprice_micros = 1\nvalidity_s = 60\n'
     '[[offer.allowance]]\nrating_group = 1\nunit = "time"\nunits = 0\n',
     "offer[0].allowance[0].units: required, a whole number 1..9007199254740991"),
    (PLAN_A + '[[offer]]\nid = "a"\nprice_micros = 1\nvalidity_s = 60\n'
     '[[offer.allowance]]\nrating_group = 1\nunit = "time"\nunits = 5\n',
     "offer[0].id: 'a' names an earlier offer or a plan"),
])
def test_bad_catalogues_are_refused_naming_file_field_and_reason(
        tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "catalogue.toml"
    path.write_text(text)
    with pytest.raises(PlanError) as refused:
        load_catalogue(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert reason in str(refused.value)


def test_a_plan_file_is_a_catalogue_of_its_one_plan() -> None:
    catalogue = load_catalogue(Path(__file__).parent / "plan.toml")
    assert list(catalogue.plans) == [catalogue.default_plan_id] == ["default"]


def _cli(port: int, *command: str) -> dict[str, Any]:
    finished = subprocess.run(
        [sys.executable, "-m", "creditline", command[0], "--server", f"127.0.0.1:{port}",
         *command[1:]], capture_output=True, text=True, timeout=60, check=False)
    assert finished.returncode == 0, finished.stderr
    result: dict[str, Any] = json.loads(finished.stdout)
    return result


async def test_the_cli_lists_plans_and_puts_accounts_on_them(
        servers: list[RunningServer], books: Books) -> None:
    port = servers[0].port
    listed = await asyncio.to_thread(_cli, port, "plans")
    assert [p["plan_id"] for p in listed["plans"]] == ["standard", "cheap"]
    account_id = f"cat{os.getpid()}-cli"
    created = await asyncio.to_thread(_cli, port, "account", "create", account_id,
                                      "--balance-micros", "1000000", "--plan", "cheap")
    books.track(account_id)
    assert created["plan_id"] == "cheap"
    assert [o["offer_id"] for o in listed["offers"]] == [
        "sms-10", "voice-hour", "sms-daily", "sms-daily-bar", "sms-daily-credit", "voice-monthly"]
    bought = await asyncio.to_thread(_cli, port, "account", "buy", account_id, "voice-hour")
    assert bought["purchased_micros"] == "500000"  # (JSON: int64 as a string)
    changed = await asyncio.to_thread(_cli, port, "account", "change-plan", account_id,
                                      "standard")
    assert changed["plan_id"] == "standard"
    await books.assert_balanced()
