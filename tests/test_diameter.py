"""Gy over Diameter against an implementation no one here wrote: python-diameter's client
node as the gateway, connected to the server's Diameter listener, runs the scenarios the
gRPC tests run: Initial / Update / Terminate with two rating groups, exhaustion with
Final-Unit-Indication then 4012, a retransmission answered from what was stored, an
unknown session, an unknown subscriber, events (debit, check balance, price enquiry,
refund). The books after each. The protocol's edges (a CCR before CER, an unknown peer,
an unknown mandatory AVP, frames that cannot be read) are sent byte by byte by
tests/diameter_raw.py; the other peers' connections are checked unaffected."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import count
from typing import Any

from creditline.api.app import RunningServer
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc

from tests.books import Books
from tests.conftest import Backend
from tests.diameter_peer import Gateway, gateway, mscc
from tests.test_subscriptions import admin_of, serving
from tests.test_telemetry import samples_of, scrape, total_of

INITIAL, UPDATE, TERMINATION, EVENT = 1, 2, 3, 4
RG_VOICE, RG_SMS = 100, 300     # tests/catalogue.toml, plan standard: 10,000 a second,
VOICE_PER_S, SMS_EACH = 10_000, 50_000  # 50,000 a message
DIAMETER = {"diameter_listen": "127.0.0.1:0"}
_numbers = count()


@asynccontextmanager
async def diameter_server(backend: Backend, **settings: Any
                          ) -> AsyncIterator[tuple[RunningServer, admin_pb2_grpc.AdminStub]]:
    async with serving(backend, **{**DIAMETER, **settings}) as (running,), \
            admin_of(running) as admin:
        yield running, admin


async def subscriber(admin: admin_pb2_grpc.AdminStub, books: Books, balance: int
                     ) -> tuple[str, str]:
    """(account id, its MSISDN) of a new account bound to a new E.164 identity."""
    number = next(_numbers)
    account_id = f"dia{os.getpid()}-{number}"
    msisdn = f"49170{os.getpid() % 100_000:05d}{number:04d}"
    await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=balance))
    await admin.SetSubscriberIdentity(admin_pb.SetSubscriberIdentityRequest(
        type=admin_pb.END_USER_E164, data=msisdn, account_id=account_id))
    books.track(account_id)
    return account_id, msisdn


def _port(running: RunningServer) -> int:
    assert running.diameter is not None
    return running.diameter.port


def _block(cca: Any, rating_group: int) -> Any:
    return next(b for b in cca.multiple_services_credit_control
                if b.rating_group == rating_group)


async def _balance(admin: admin_pb2_grpc.AdminStub, account_id: str) -> int:
    account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    return account.balance_micros


async def test_a_session_with_two_rating_groups_is_charged_as_over_grpc(
        backend: Backend, backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn,
                                       mscc(RG_VOICE, {"cc_time": 30}),
                                       mscc(RG_SMS, {"cc_service_specific_units": 2})))
            assert (cca.result_code, cca.cc_request_type, cca.cc_request_number) == (
                2001, INITIAL, 0)
            assert cca.cc_session_failover == 1  # FAILOVER_SUPPORTED: the state is in Redis
            voice, sms = _block(cca, RG_VOICE), _block(cca, RG_SMS)
            assert (voice.result_code, voice.granted_service_unit.cc_time,
                    voice.validity_time) == (2001, 30, 1800)
            assert sms.granted_service_unit.cc_service_specific_units == 2
            cca = await gw.send(gw.ccr(sid, UPDATE, 1, msisdn,
                                       mscc(RG_VOICE, {"cc_time": 30}, {"cc_time": 30}),
                                       mscc(RG_SMS, used={"cc_service_specific_units": 2})))
            assert cca.result_code == 2001
            cca = await gw.send(gw.ccr(sid, TERMINATION, 2, msisdn,
                                       mscc(RG_VOICE, used={"cc_time": 20})))
            assert cca.result_code == 2001
        charged = 50 * VOICE_PER_S + 2 * SMS_EACH
        assert await _balance(admin, account_id) == 1_000_000 - charged
    await backend_books.assert_balanced()


async def test_exhaustion_gives_final_units_then_4012(backend: Backend,
                                                      backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 100_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 60})))
            voice = _block(cca, RG_VOICE)
            assert voice.granted_service_unit.cc_time == 10
            assert voice.final_unit_indication is not None
            assert voice.final_unit_indication.final_unit_action == 0  # TERMINATE
            cca = await gw.send(gw.ccr(sid, UPDATE, 1, msisdn,
                                       mscc(RG_VOICE, {"cc_time": 60}, {"cc_time": 10})))
            assert _block(cca, RG_VOICE).result_code == 4012
            await gw.send(gw.ccr(sid, TERMINATION, 2, msisdn, mscc(RG_VOICE, used={"cc_time": 0})))
        assert await _balance(admin, account_id) == 0
    await backend_books.assert_balanced()


async def test_a_retransmission_gets_the_stored_answer_and_is_charged_once(
        backend: Backend, backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 30})))
            first = await gw.send(gw.ccr(sid, UPDATE, 1, msisdn,
                                         mscc(RG_VOICE, {"cc_time": 30}, {"cc_time": 30})))
            again = gw.ccr(sid, UPDATE, 1, msisdn,
                           mscc(RG_VOICE, {"cc_time": 30}, {"cc_time": 30}))
            again.header.is_retransmit = True
            second = await gw.send(again)
            assert second.result_code == first.result_code == 2001
            assert (_block(second, RG_VOICE).granted_service_unit.cc_time
                    == _block(first, RG_VOICE).granted_service_unit.cc_time == 30)
            assert await _balance(admin, account_id) == 1_000_000 - 30 * VOICE_PER_S
            await gw.send(gw.ccr(sid, TERMINATION, 2, msisdn, mscc(RG_VOICE, used={"cc_time": 0})))
    await backend_books.assert_balanced()


async def test_unknown_sessions_and_subscribers_are_refused(backend: Backend,
                                                            backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        _, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            cca = await gw.send(gw.ccr(gw.session_id(), UPDATE, 1, msisdn,
                                       mscc(RG_VOICE, {"cc_time": 30}, {"cc_time": 30})))
            assert cca.result_code == 5002
            cca = await gw.send(gw.ccr(gw.session_id(), INITIAL, 0, "491999999999",
                                       mscc(RG_VOICE, {"cc_time": 30})))
            assert cca.result_code == 5030
            cca = await gw.send(gw.ccr(gw.session_id(), INITIAL, 0, None,
                                       mscc(RG_VOICE, {"cc_time": 30})))
            assert cca.result_code == 5030
    await backend_books.assert_balanced()


async def test_events_debit_check_price_and_refund(backend: Backend,
                                                   backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            price = await gw.send(gw.ccr(gw.session_id(), EVENT, 0, msisdn,
                                         mscc(RG_SMS, {"cc_service_specific_units": 3}),
                                         requested_action=3))
            assert price.result_code == 2001
            assert price.cost_information.unit_value.value_digits == 3 * SMS_EACH
            assert price.cost_information.unit_value.exponent == -6
            check = await gw.send(gw.ccr(gw.session_id(), EVENT, 0, msisdn,
                                         mscc(RG_SMS, {"cc_service_specific_units": 30}),
                                         requested_action=2))
            assert check.check_balance_result == 1  # NO_CREDIT: 1,500,000 > 1,000,000
            debit_sid = gw.session_id()
            debit = await gw.send(gw.ccr(debit_sid, EVENT, 0, msisdn,
                                         mscc(RG_SMS, {"cc_service_specific_units": 2}),
                                         requested_action=0))
            assert debit.result_code == 2001
            assert _block(debit, RG_SMS).granted_service_unit.cc_service_specific_units == 2
            assert await _balance(admin, account_id) == 1_000_000 - 2 * SMS_EACH
            refund = await gw.send(gw.ccr(gw.session_id(), EVENT, 0, msisdn,
                                          mscc(RG_SMS, {"cc_service_specific_units": 1}),
                                          requested_action=1,
                                          cc_correlation_id=debit_sid.encode()))
            assert refund.result_code == 2001
            assert await _balance(admin, account_id) == 1_000_000 - SMS_EACH
    await backend_books.assert_balanced()


async def test_two_gateways_share_the_listener(backend: Backend, backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        _, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running), origin_host="gw1.test") as one, \
                gateway(_port(running), origin_host="gw2.test") as two:
            assert {p.origin_host for p in running.diameter.peers} == {"gw1.test", "gw2.test"} \
                if running.diameter else False
            for gw in (one, two):
                sid = gw.session_id()
                cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 5})))
                assert cca.result_code == 2001
                await gw.send(gw.ccr(sid, TERMINATION, 1, msisdn,
                                     mscc(RG_VOICE, used={"cc_time": 5})))
    await backend_books.assert_balanced()


async def _pushed(gw: Gateway) -> Any:
    """The next request the server pushed to the gateway (RAR, ASR)."""
    return await asyncio.to_thread(gw.requests.get, True, 10)


async def test_a_top_up_pushes_a_rar_and_the_gateway_asks_again(
        backend: Backend, backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 100_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 60})))
            assert _block(cca, RG_VOICE).final_unit_indication is not None
            await admin.TopUp(admin_pb.TopUpRequest(account_id=account_id,
                                                    amount_micros=500_000, top_up_id=sid))
            rar = await _pushed(gw)
            assert (rar.header.command_code, rar.session_id, rar.re_auth_request_type) == (
                258, sid, 0)
            assert rar.auth_application_id == 4
            assert gw.requests.empty()  # (one RAR for the session)
            cca = await gw.send(gw.ccr(sid, UPDATE, 1, msisdn,
                                       mscc(RG_VOICE, {"cc_time": 60}, {"cc_time": 10})))
            assert _block(cca, RG_VOICE).granted_service_unit.cc_time == 50
            await gw.send(gw.ccr(sid, TERMINATION, 2, msisdn,
                                 mscc(RG_VOICE, used={"cc_time": 50})))
        assert await _balance(admin, account_id) == 0
        assert running.diameter is not None and running.diameter.push.sent == 1
    await backend_books.assert_balanced()


async def test_barring_a_group_pushes_an_asr_for_its_members_sessions(
        backend: Backend, backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        group_id, _ = await subscriber(admin, backend_books, 1_000_000)
        member_id = f"{group_id}/kid"
        msisdn = f"4915{os.getpid() % 100_000:05d}{next(_numbers):04d}"
        await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id=member_id))
        await admin.SetSubscriberIdentity(admin_pb.SetSubscriberIdentityRequest(
            type=admin_pb.END_USER_E164, data=msisdn, account_id=member_id))
        backend_books.track(member_id)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 30})))
            assert cca.result_code == 2001
            await admin.SetAccountState(admin_pb.SetAccountStateRequest(
                account_id=group_id, state=admin_pb.BARRED))
            asr = await _pushed(gw)
            assert (asr.header.command_code, asr.session_id, asr.auth_application_id) == (
                274, sid, 4)
            cca = await gw.send(gw.ccr(sid, TERMINATION, 1, msisdn,
                                       mscc(RG_VOICE, used={"cc_time": 12})))
            assert cca.result_code == 2001
        assert await _balance(admin, group_id) == 1_000_000 - 12 * VOICE_PER_S
    await backend_books.assert_balanced()


async def test_usage_above_the_grant_is_charged_as_reported(backend: Backend,
                                                           backend_books: Books) -> None:
    async with diameter_server(backend) as (running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            cca = await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 30})))
            assert _block(cca, RG_VOICE).granted_service_unit.cc_time == 30
            cca = await gw.send(gw.ccr(sid, TERMINATION, 1, msisdn,
                                       mscc(RG_VOICE, used={"cc_time": 45})))
            assert cca.result_code == 2001
        assert await _balance(admin, account_id) == 1_000_000 - 45 * VOICE_PER_S
    await backend_books.assert_balanced()


async def test_diameter_charging_is_counted_with_its_transport_and_equals_the_books(
        backend: Backend, backend_books: Books) -> None:
    """The money and request counters a Prometheus scrape shows after a session and an
    event over Diameter: the books' charges, each CCR counted once under its method."""
    async with diameter_server(backend, metrics_listen_address="127.0.0.1:0") as (
            running, admin):
        account_id, msisdn = await subscriber(admin, backend_books, 1_000_000)
        async with gateway(_port(running)) as gw:
            sid = gw.session_id()
            await gw.send(gw.ccr(sid, INITIAL, 0, msisdn, mscc(RG_VOICE, {"cc_time": 30})))
            await gw.send(gw.ccr(sid, UPDATE, 1, msisdn,
                                 mscc(RG_VOICE, {"cc_time": 30}, {"cc_time": 30})))
            await gw.send(gw.ccr(sid, TERMINATION, 2, msisdn,
                                 mscc(RG_VOICE, used={"cc_time": 10})))
            debit = await gw.send(gw.ccr(gw.session_id(), EVENT, 0, msisdn,
                                         mscc(RG_SMS, {"cc_service_specific_units": 2}),
                                         requested_action=0))
            assert debit.result_code == 2001
        samples = samples_of(await asyncio.to_thread(
            scrape, f"http://127.0.0.1:{running.telemetry.prometheus_port}/metrics"))
    [books] = [await backend_books.read(account_id)]
    assert books.charged == 40 * VOICE_PER_S + 2 * SMS_EACH
    assert total_of(samples, "creditline_charged_total") == books.charged
    assert total_of(samples, "creditline_units_granted_total", creditline_unit="time_s") == 60
    for method in ("Initial", "Update", "Terminate", "Event"):
        assert total_of(samples, "creditline_rpc_requests_total", rpc_method=method,
                        creditline_transport="diameter", creditline_result_code="2001") == 1
    await backend_books.assert_balanced()
