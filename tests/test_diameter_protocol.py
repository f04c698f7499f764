"""The Diameter listener's protocol edges (RFC 6733), byte by byte (tests/diameter_raw.py):
CER first or the connection closes, unknown peers and peers without credit control
refused, watchdogs and disconnection answered, an unknown command and an unknown mandatory
AVP answered with their errors (Failed-AVP naming the AVP), frames that cannot be read end
their own connection and no other, and 10,000 fuzzed messages that never crash the
listener, never touch another peer's connection and never charge anything; TLS from the
first byte and TLS after the capabilities exchange (Inband-Security-Id, 5017 when none can
be agreed), on asyncio's loop and uvloop; SCTP where the OS has it, and a clear refusal to
start where it has not. On one Redis: nothing here depends on where the money is."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from creditline.api.app import RunningServer
from creditline.diameter import message as dm
from creditline.diameter.codec import AVP_MANDATORY, FLAG_ERROR, CodecError
from creditline.diameter.dictionary import AvpCode, Command, InbandSecurity
from creditline.diameter.message import Message
from creditline.diameter.node import peer_rules
from creditline.diameter.peer import Peer
from creditline.diameter.sctp import StreamListener, sctp_listener
from creditline.errors import SettingsError
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc

from tests.books import Books
from tests.conftest import Backend
from tests.diameter_raw import RawPeer, ccr_avps, result_code, sms_debit, sms_used
from tests.test_diameter import subscriber
from tests.test_security import CertificateAuthority, Identity
from tests.test_subscriptions import admin_of, serving

SMS_EACH = 50_000
NONE, TLS = InbandSecurity.NO_INBAND_SECURITY, InbandSecurity.TLS
TLS_REFUSED = (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)


def _os_has_sctp() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError:
        return False
    return True


HAS_SCTP = _os_has_sctp()


@pytest.fixture
def one_redis(redis_process: RedisProcess) -> Backend:
    return Backend(redis_process.url, cluster=False)


@asynccontextmanager
async def listener(backend: Backend, **settings: Any
                   ) -> AsyncIterator[tuple[int, RunningServer, admin_pb2_grpc.AdminStub]]:
    async with serving(backend, diameter_listen="127.0.0.1:0", **settings) as (running,), \
            admin_of(running) as admin:
        assert running.diameter is not None
        yield running.diameter.port, running, admin


async def test_the_capabilities_exchange_comes_first_and_names_credit_control(
        one_redis: Backend) -> None:
    async with listener(one_redis) as (port, running, _):
        early = await RawPeer.connect(port)
        await early.send(early.request(Command.CREDIT_CONTROL, []))
        assert await early.closed_by_server()
        no_gy = await RawPeer.connect(port, "nogy.test")
        cea = await no_gy.exchange(no_gy.cer(applications=(16777238,)))  # Gx only
        assert result_code(cea) == 5010
        assert await no_gy.closed_by_server()
        peer = await RawPeer.connect(port)
        cea = await peer.open()
        assert result_code(cea) == 2001
        assert dm.utf8(dm.required(cea.avps, AvpCode.ORIGIN_HOST)) == "creditline.localdomain"
        assert dm.unsigned32(dm.required(cea.avps, AvpCode.AUTH_APPLICATION_ID)) == 4
        dwa = await peer.exchange(peer.request(Command.DEVICE_WATCHDOG, peer.identity(), 0))
        assert (dwa.command_code, dwa.is_request, result_code(dwa)) == (280, False, 2001)
        unknown = await peer.exchange(peer.request(Command.RE_AUTH + 1000, peer.identity()))
        assert (result_code(unknown), bool(unknown.flags & FLAG_ERROR)) == (3001, True)
        dpa = await peer.exchange(peer.request(Command.DISCONNECT_PEER, [
            *peer.identity(), dm.u32(AvpCode.DISCONNECT_CAUSE, 0)], 0))
        assert result_code(dpa) == 2001
        assert await peer.closed_by_server()
        assert running.diameter is not None and running.diameter.peers == set()


async def test_only_configured_peers_are_served(one_redis: Backend) -> None:
    async with listener(one_redis, diameter_peers="gw.allowed@127.0.0.1,gw.elsewhere@10.9.9.9",
                        diameter_peer_realms="raw") as (port, _, _):
        for host, expected in (("gw.allowed", 2001), ("gw.elsewhere", 3010),
                               ("gw.stranger", 3010)):
            peer = await RawPeer.connect(port, host)
            assert result_code(await peer.open()) == expected, host
            await peer.close()


async def test_an_unknown_mandatory_avp_is_refused_and_nothing_is_charged(
        one_redis: Backend, books: Books) -> None:
    async with listener(one_redis) as (port, _, admin):
        account_id, msisdn = await subscriber(admin, books, 1_000_000)
        peer = await RawPeer.connect(port)
        await peer.open()
        strange = (99_999, AVP_MANDATORY, 0, b"\x00\x00\x00\x07")
        answer = await peer.exchange(peer.request(Command.CREDIT_CONTROL, ccr_avps(
            f"raw;{account_id};1", 4, 0, msisdn, sms_debit(2), strange)))
        assert result_code(answer) == 5001
        failed = dm.required(answer.avps, AvpCode.FAILED_AVP)
        assert dm.grouped(failed) == [strange]
        # the same without the M flag is passed over: charged
        passed = await peer.exchange(peer.request(Command.CREDIT_CONTROL, ccr_avps(
            f"raw;{account_id};2", 4, 0, msisdn, sms_debit(2), (99_999, 0, 0, b"\0\0\0\7"))))
        assert result_code(passed) == 2001
        account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert account.balance_micros == 1_000_000 - 2 * SMS_EACH
        await peer.close()
    await books.assert_balanced()


async def test_an_unreadable_frame_ends_its_connection_only(one_redis: Backend) -> None:
    async with listener(one_redis) as (port, _, _):
        bystander = await RawPeer.connect(port, "bystander.test")
        await bystander.open()
        for frame in (b"\x02" + b"\x00\x00\x14" + bytes(16),      # version 2
                      b"\x01\x00\x00\x00" + bytes(16),             # length 0 (no spin)
                      b"\x01\x00\x00\x15" + bytes(17),             # not a multiple of 4
                      b"\x01\xff\xff\xfc" + bytes(16)):            # above max_message_bytes
            peer = await RawPeer.connect(port)
            await peer.open()
            await peer.send(frame)
            assert await peer.closed_by_server(), frame[:4]
        dwa = await bystander.exchange(bystander.request(Command.DEVICE_WATCHDOG,
                                                         bystander.identity(), 0))
        assert result_code(dwa) == 2001
        await bystander.close()


async def test_a_malformed_avp_is_answered_with_it_and_the_connection_goes_on(
        one_redis: Backend) -> None:
    async with listener(one_redis) as (port, _, _):
        peer = await RawPeer.connect(port)
        await peer.open()
        good = peer.request(Command.CREDIT_CONTROL, ccr_avps("raw;m;1", 4, 0, "4930", sms_debit(1)))
        # the last AVP claims 4 bytes more than the message holds
        broken = bytearray(good)
        last = len(broken) - 12  # (the MSCC's Rating-Group: the message's last 12 bytes)
        struct.pack_into(">I", broken, last + 4, struct.unpack_from(">I", broken, last + 4)[0] + 64)
        answer = await peer.exchange(bytes(broken))
        assert result_code(answer) == 5014
        assert dm.find(answer.avps, AvpCode.FAILED_AVP) is not None
        dwa = await peer.exchange(peer.request(Command.DEVICE_WATCHDOG, peer.identity(), 0))
        assert result_code(dwa) == 2001
        await peer.close()


def _mutations(frame: bytes, rng: random.Random, header_too: bool) -> bytes:
    """The frame with a few bytes changed: past the header (framing kept), or anywhere."""
    mutated = bytearray(frame)
    first = 0 if header_too else 20
    for _ in range(rng.randint(1, 4)):
        mutated[rng.randrange(first, len(mutated))] = rng.randrange(256)
    return bytes(mutated)


def _malformed(frame: bytes) -> bool:
    """What the server must refuse: a frame our codec cannot decode, or whose AVPs (the
    mandatory check, the grouped AVPs it reads) cannot be read."""
    try:
        message = dm.decode_message(frame)
        dm.check_mandatory(message.avps)
    except (CodecError, dm.AvpError):
        return True
    return False


async def test_ten_thousand_fuzzed_messages_never_crash_or_charge(
        one_redis: Backend, books: Books) -> None:
    rng = random.Random(20261207)
    async with listener(one_redis) as (port, running, admin):
        account_id, msisdn = await subscriber(admin, books, 1_000_000)
        bystander = await RawPeer.connect(port, "bystander.test")
        await bystander.open()
        peer = await RawPeer.connect(port)
        await peer.open()
        sent = 0
        while sent < 9_500:  # framing kept: one connection, every one answered
            frame = _mutations(peer.request(Command.CREDIT_CONTROL, ccr_avps(
                f"fuzz;{sent}", 4, 0, msisdn, sms_debit(1))), rng, header_too=False)
            if not _malformed(frame):
                continue
            answer = await peer.exchange(frame)
            assert result_code(answer) != 2001
            sent += 1
        while sent < 10_000:  # anywhere, the header too: a connection each
            frame = _mutations(peer.request(Command.CREDIT_CONTROL, ccr_avps(
                f"fuzz;{sent}", 4, 0, msisdn, sms_debit(1))), rng, header_too=True)
            if not _malformed(frame):
                continue
            one = await RawPeer.connect(port)
            await one.open()
            await one.send(frame)
            await one.close()
            sent += 1
        await peer.close()
        dwa = await bystander.exchange(bystander.request(Command.DEVICE_WATCHDOG,
                                                         bystander.identity(), 0))
        assert result_code(dwa) == 2001
        account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert (account.balance_micros, account.charged_micros) == (1_000_000, 0)
        await bystander.close()
        assert running.diameter is not None
    await books.assert_balanced()


async def test_a_silent_peer_gets_a_watchdog_and_is_dropped_when_it_does_not_answer(
        one_redis: Backend) -> None:
    async with listener(one_redis, diameter_watchdog_s=0.3) as (port, running, _):
        peer = await RawPeer.connect(port)
        await peer.open()
        dwr = await peer.read()  # after 0.3 s of silence
        assert (dwr.command_code, dwr.is_request) == (Command.DEVICE_WATCHDOG, True)
        await peer.send(dm.encode_message(dm.Message(
            0, dwr.command_code, 0, dwr.hop_by_hop, dwr.end_to_end,
            [dm.u32(AvpCode.RESULT_CODE, 2001), *peer.identity()])))
        again = await peer.read()  # answered: still open, asked again later
        assert again.command_code == Command.DEVICE_WATCHDOG
        assert await peer.closed_by_server()  # not answered: dropped
        assert running.diameter is not None and running.diameter.peers == set()


async def test_a_peer_gone_mid_session_leaves_it_to_supervision(
        one_redis: Backend, books: Books) -> None:
    async with listener(one_redis) as (port, running, admin):
        account_id, msisdn = await subscriber(admin, books, 1_000_000)
        peer = await RawPeer.connect(port)
        await peer.open()
        session_id = f"raw;{account_id};gone"
        voice = dm.group(AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL, [
            dm.group(AvpCode.REQUESTED_SERVICE_UNIT, [dm.u32(AvpCode.CC_TIME, 30)]),
            dm.u32(AvpCode.RATING_GROUP, 100)])
        cca = await peer.exchange(peer.request(Command.CREDIT_CONTROL, ccr_avps(
            session_id, 1, 0, msisdn, voice)))
        assert result_code(cca) == 2001
        await peer.close()  # the gateway crashes
        later_ms = running.store.clock.now_ms() + 86_400_000
        assert await running.store.close_if_stale(account_id, session_id, later_ms)
        account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert (account.balance_micros, account.reserved_micros, account.open_sessions) == (
            1_000_000, 0, 0)
    await books.assert_balanced()


@dataclass(frozen=True)
class Certificates:
    """The server's certificate files as settings (peers' certificates of the test CA
    required), a gateway's client context the CA signed, and one another CA signed."""

    settings: dict[str, str]
    trusted: ssl.SSLContext
    stranger: ssl.SSLContext


def _certificates(directory: Path) -> Certificates:
    ca = CertificateAuthority(directory)
    # (names without dots: issue() names its files by them, a dot would start a suffix)
    server = ca.issue("creditline", server=True)
    stranger = CertificateAuthority(directory, "another CA").issue("gw-stranger")
    return Certificates(
        {"diameter_tls_cert_file": str(server.cert_path),
         "diameter_tls_key_file": str(server.key_path),
         "diameter_tls_client_ca_file": str(ca.path)},
        _client_context(ca, ca.issue("gw-tls")), _client_context(ca, stranger))


def _client_context(ca: CertificateAuthority, identity: Identity) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.load_cert_chain(identity.cert_path, identity.key_path)
    return context


def _inband_security(cea: Message) -> list[int]:
    return [dm.unsigned32(a) for a in dm.find_all(cea.avps, AvpCode.INBAND_SECURITY_ID)]


async def test_tls_from_the_first_byte_with_peer_certificates(
        one_redis: Backend, tmp_path: Path) -> None:
    certificates = _certificates(tmp_path)
    async with listener(one_redis, **certificates.settings) as (port, _, _):
        peer = await RawPeer.connect(port, "gw.tls", tls=certificates.trusted)
        assert result_code(await peer.open()) == 2001
        await peer.close()
        # TLS already: Inband-Security-Id has no say (a CER offering only TLS, or only none)
        for security in ((TLS,), (NONE,)):
            peer = await RawPeer.connect(port, "gw.tls", tls=certificates.trusted)
            cea = await peer.exchange(peer.cer(security=security))
            assert (result_code(cea), _inband_security(cea)) == (2001, [])
            await peer.close()
        with pytest.raises(TLS_REFUSED):
            other = await RawPeer.connect(port, "gw.stranger", tls=certificates.stranger)
            await other.open()
        with pytest.raises(TLS_REFUSED):
            plain = await RawPeer.connect(port)  # no TLS at all: the handshake fails
            await plain.open()


async def _open_in_tls(port: int, tls: ssl.SSLContext, origin_host: str = "raw.test"
                       ) -> RawPeer:
    """A peer connected in clear whose CER offers TLS, upgraded after the CEA agreeing it."""
    peer = await RawPeer.connect(port, origin_host)
    cea = await peer.exchange(peer.cer(security=(NONE, TLS)))
    assert (result_code(cea), _inband_security(cea)) == (2001, [TLS])
    await peer.start_tls(tls)
    return peer


async def _two_sms_session(peer: RawPeer, admin: admin_pb2_grpc.AdminStub, account_id: str,
                           msisdn: str) -> None:
    """CCR-I reserving 2 SMS, CCR-T reporting them used: charged from a balance of 1,000,000."""
    session_id = f"raw;{account_id};2sms"
    initial = await peer.exchange(peer.request(Command.CREDIT_CONTROL, ccr_avps(
        session_id, 1, 0, msisdn, sms_debit(2))))
    assert result_code(initial) == 2001
    held = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    assert held.reserved_micros == 2 * SMS_EACH
    final = await peer.exchange(peer.request(Command.CREDIT_CONTROL, ccr_avps(
        session_id, 3, 1, msisdn, sms_used(2))))
    assert result_code(final) == 2001
    account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
    assert (account.balance_micros, account.reserved_micros) == (1_000_000 - 2 * SMS_EACH, 0)


async def test_tls_after_the_capabilities_exchange_charges_over_tls(
        one_redis: Backend, books: Books, tmp_path: Path) -> None:
    certificates = _certificates(tmp_path)
    async with listener(one_redis, diameter_tls_after_cer=True,
                        **certificates.settings) as (port, _, admin):
        account_id, msisdn = await subscriber(admin, books, 1_000_000)
        peer = await RawPeer.connect(port)
        cea = await peer.exchange(peer.cer(security=(TLS,)))
        assert (result_code(cea), _inband_security(cea)) == (2001, [TLS])
        await peer.start_tls(certificates.trusted)
        assert peer.writer.get_extra_info("ssl_object") is not None
        assert result_code(await peer.exchange(peer.watchdog())) == 2001
        await _two_sms_session(peer, admin, account_id, msisdn)
        await peer.close()
    await books.assert_balanced()


async def test_tls_after_cer_refuses_what_is_not_tls(
        one_redis: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certificates = _certificates(tmp_path)
    async with listener(one_redis, diameter_tls_after_cer=True,
                        **certificates.settings) as (port, running, _):
        bystander = await _open_in_tls(port, certificates.trusted, "bystander.test")
        # a certificate of another CA: the handshake fails, that connection only ends
        with caplog.at_level(logging.WARNING, logger="creditline.diameter.peer"), \
                pytest.raises(TLS_REFUSED):
            stranger = await _open_in_tls(port, certificates.stranger, "gw.stranger")
            await stranger.exchange(stranger.watchdog())
        assert "TLS handshake after CER failed" in caplog.text
        # Diameter in clear after the CEA is read as the handshake, never as a request
        clear = await RawPeer.connect(port)
        assert result_code(await clear.exchange(clear.cer(security=(TLS,)))) == 2001
        await clear.send(clear.watchdog())
        assert await clear.closed_by_server()
        # sent before the CEA was read: not a handshake either
        eager = await RawPeer.connect(port)
        await eager.send(eager.cer(security=(TLS,)) + eager.watchdog())
        assert result_code(await eager.read()) == 2001
        assert await eager.closed_by_server()
        # TLS configured: a peer that offers none (or says nothing) is refused
        for security in ((NONE,), ()):
            peer = await RawPeer.connect(port)
            cea = await peer.exchange(peer.cer(security=security))
            assert result_code(cea) == 5017, security
            assert await peer.closed_by_server()
        assert result_code(await bystander.exchange(bystander.watchdog())) == 2001
        assert running.diameter is not None
        assert {p.origin_host for p in running.diameter.peers} == {"bystander.test"}
        await bystander.close()


async def test_a_plain_listener_refuses_a_cer_that_offers_only_tls(one_redis: Backend) -> None:
    async with listener(one_redis) as (port, _, _):
        only_tls = await RawPeer.connect(port)
        assert result_code(await only_tls.exchange(only_tls.cer(security=(TLS,)))) == 5017
        assert await only_tls.closed_by_server()
        either = await RawPeer.connect(port)
        cea = await either.exchange(either.cer(security=(NONE, TLS)))
        assert (result_code(cea), _inband_security(cea)) == (2001, [])
        assert result_code(await either.exchange(either.watchdog())) == 2001
        await either.close()


def test_a_peer_on_uvloop_answers_the_cer() -> None:
    """`creditline serve` runs on uvloop, whose transports are no asyncio.Transport
    subclasses (the other tests run on asyncio's own loop): a check of the transport's
    class there refused every connection."""
    async def no_ccr(peer: Peer, request: Message) -> Message:
        raise AssertionError("no CCR is sent here")

    async def exchange() -> int:
        rules = peer_rules(Settings(), ("127.0.0.1",))
        server = await asyncio.get_running_loop().create_server(
            lambda: Peer(rules, no_ccr, lambda peer: True, lambda peer: None), "127.0.0.1", 0)
        try:
            raw = await RawPeer.connect(server.sockets[0].getsockname()[1])
            code = result_code(await raw.open())
            await raw.close()
            return code
        finally:
            server.close()

    assert uvloop.run(exchange()) == 2001


def test_tls_after_cer_on_uvloop(tmp_path: Path) -> None:
    """The upgrade through uvloop's start_tls (the server's loop): a peer in TLS after its
    CEA, and a refused certificate ending its own connection."""
    certificates = _certificates(tmp_path)

    async def no_ccr(peer: Peer, request: Message) -> Message:
        raise AssertionError("no CCR is sent here")

    async def exchange() -> tuple[int, bool]:
        rules = peer_rules(Settings(diameter_tls_after_cer=True, **certificates.settings),
                           ("127.0.0.1",))
        server = await asyncio.get_running_loop().create_server(
            lambda: Peer(rules, no_ccr, lambda peer: True, lambda peer: None), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            peer = await _open_in_tls(port, certificates.trusted)
            code = result_code(await peer.exchange(peer.watchdog()))
            await peer.close()
            try:
                stranger = await _open_in_tls(port, certificates.stranger)
                await stranger.exchange(stranger.watchdog())
            except TLS_REFUSED:
                return code, True
            return code, False
        finally:
            server.close()

    assert uvloop.run(exchange()) == (2001, True)


def test_the_transport_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="diameter_transport: 'udp'"):
        Settings(diameter_transport="udp")
    with pytest.raises(SettingsError, match="DTLS"):
        Settings(diameter_transport="sctp", **_certificates(tmp_path).settings)
    with pytest.raises(SettingsError, match="diameter_tls_after_cer: needs diameter_tls_cert"):
        Settings(diameter_tls_after_cer=True)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_sctp_listeners_transport_serves_a_peer(loop: str) -> None:
    """The accept loop and socket transport the SCTP listener uses (sctp.py: uvloop's own
    transports cannot hold an SCTP socket), over a TCP socket where the OS has no SCTP:
    CER, DWR, a burst of DWRs in one write, DPR, the server's close; a peer closing its
    end is seen."""
    async def no_ccr(peer: Peer, request: Message) -> Message:
        raise AssertionError("no CCR is sent here")

    async def exchange() -> list[int]:
        rules = peer_rules(Settings(), ("127.0.0.1",))
        closed = asyncio.Event()
        listening = (sctp_listener("127.0.0.1", 0, reuse_port=False) if HAS_SCTP
                     else socket.create_server(("127.0.0.1", 0)))
        listening.setblocking(False)
        # (a small send buffer, inherited by the accepted socket: answers wait in the
        # transport for the socket to take them)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server = StreamListener(listening, lambda: Peer(
            rules, no_ccr, lambda peer: True, lambda peer: closed.set()))
        port = listening.getsockname()[1]
        try:
            raw = await RawPeer.connect(port, sctp=HAS_SCTP)
            codes = [result_code(await raw.open())]
            await raw.send(b"".join(raw.watchdog() for _ in range(3000)))
            codes += {result_code(await raw.read()) for _ in range(3000)}
            codes.append(result_code(await raw.exchange(raw.request(
                Command.DISCONNECT_PEER, [*raw.identity(), dm.u32(AvpCode.DISCONNECT_CAUSE, 0)],
                0))))
            codes.append(int(await raw.closed_by_server()))
            gone = await RawPeer.connect(port, sctp=HAS_SCTP)
            await gone.open()
            closed.clear()
            await gone.close()
            await asyncio.wait_for(closed.wait(), 10)
            return codes
        finally:
            server.close()
            await server.wait_closed()

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(exchange()) == [2001, 2001, 2001, 1]


@pytest.mark.skipif(HAS_SCTP, reason="this OS has SCTP")
def test_sctp_where_the_os_has_none_is_refused_at_start_naming_the_cause() -> None:
    with pytest.raises(SettingsError, match=r"this OS has no SCTP \(errno \d+ .*\); load the sctp "
                                            r"kernel module .* or use tcp"):
        sctp_listener("127.0.0.1", 0, reuse_port=False)
    result = subprocess.run(
        [sys.executable, "-m", "creditline", "serve", "--workers", "1",
         "--listen-address", f"127.0.0.1:{free_port()}",
         "--diameter-listen", "127.0.0.1:0", "--diameter-transport", "sctp"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert "creditline: setting diameter_transport sctp: this OS has no SCTP" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not HAS_SCTP, reason="this OS has no SCTP (Linux: the sctp module)")
async def test_a_charging_session_over_sctp(one_redis: Backend, books: Books) -> None:
    async with listener(one_redis, diameter_transport="sctp") as (port, _, admin):
        account_id, msisdn = await subscriber(admin, books, 1_000_000)
        peer = await RawPeer.connect(port, sctp=True)
        assert result_code(await peer.open()) == 2001
        await _two_sms_session(peer, admin, account_id, msisdn)
        await peer.close()
    await books.assert_balanced()
