"""One Diameter peer connection (RFC 6733 §5): framing, the capabilities exchange, the
watchdog, disconnection, and the requests in both directions.

A connection starts waiting for the peer's CER: anything else first, or no CER within
`cer_timeout_s`, closes it. A CER from a peer the configuration does not allow is
answered 3010 (DIAMETER_UNKNOWN_PEER), one without the credit-control application 5010,
and the connection closed. Once open: DWR is answered, DPR answered and the connection
closed, a CCR handed to the application (`Peer.handle_request`, a task each, at most
`max_pending` at once: beyond, 3004 DIAMETER_TOO_BUSY), any other request 3001. The
server's own requests (RAR, ASR, DWR) wait for their answer by hop-by-hop id.

What cannot be read is never charged: a frame whose header is unreadable (another
version, a length below 20 or not a multiple of 4, above `max_message_bytes`) ends the
connection after an error answer where one can be addressed (the framing is lost); a
message whose AVPs are malformed is answered with the RFC 6733 error (Failed-AVP naming
the AVP) and nothing else is done with it.

TLS is either from the first byte (the listener's: Inband-Security-Id is then ignored) or,
with `tls_after_cer`, begun on the plain connection once the CEA agreeing Inband-Security-Id
TLS is written (RFC 3588 §2.1, RFC 6733 §6.10); a CER that offers no security the
connection can have is answered 5017 DIAMETER_NO_COMMON_SECURITY and the connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import random
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from creditline.diameter import message as m
from creditline.diameter.codec import (
    AVP_MANDATORY,
    FLAG_ERROR,
    FLAG_PROXIABLE,
    FLAG_REQUEST,
    HEADER_BYTES,
    Avp,
    CodecError,
    codec,
)
from creditline.diameter.dictionary import (
    BASE_APPLICATION,
    CREDIT_CONTROL_APPLICATION,
    RELAY_APPLICATION,
    AvpCode,
    Command,
    DisconnectCause,
    InbandSecurity,
    ResultCode,
)
from creditline.diameter.message import AvpError, Message

log = logging.getLogger(__name__)
VENDOR_ID = 0  # Creditline has no IANA enterprise number: Vendor-Id 0 (RFC 6733 §5.3.3)
PRODUCT_NAME = "Creditline"
_HEADER = struct.Struct(">I I I I I")


@dataclass(frozen=True, slots=True)
class PeerRules:
    """Who may connect and what one connection may hold."""

    origin_host: str
    origin_realm: str
    host_addresses: tuple[str, ...]
    # allowed peers: Origin-Host -> the addresses it may come from (empty: any); an empty
    # table allows any peer connecting from a loopback address (a first try)
    allowed_hosts: dict[str, frozenset[str]]
    allowed_realms: frozenset[str]   # empty: any realm
    max_message_bytes: int
    max_pending: int
    watchdog_s: float
    cer_timeout_s: float
    request_timeout_s: float
    origin_state_id: int
    # the listener's TLS (node.tls_context): from the first byte, or with tls_after_cer
    # begun after a CEA agreeing Inband-Security-Id TLS; None: plain only
    tls: ssl.SSLContext | None = None
    tls_after_cer: bool = False


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class PeerGoneError(ConnectionError):
    """The peer closed, or the connection was closed, before it answered."""


def answer_to(request: Message, result_code: int, *avps: Avp, error: bool = False) -> Message:
    """The answer's frame of a request: its ids, its command, no R flag."""
    flags = (request.flags & FLAG_PROXIABLE) | (FLAG_ERROR if error else 0)
    session = m.find(request.avps, AvpCode.SESSION_ID)
    head = [session] if session is not None else []
    return Message(flags, request.command_code, request.application_id, request.hop_by_hop,
                   request.end_to_end, [*head, m.u32(AvpCode.RESULT_CODE, result_code), *avps])


class Peer(asyncio.Protocol):
    """One connection. `handle_request` answers a CCR (the application's); `on_open` and
    `on_close` tell the node when the peer is there and gone."""

    def __init__(self, rules: PeerRules,
                 handle_request: Callable[[Peer, Message], Awaitable[Message]],
                 on_open: Callable[[Peer], bool], on_close: Callable[[Peer], None]) -> None:
        self._rules = rules
        self._handle_request = handle_request
        self._on_open = on_open
        self._on_close = on_close
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # frames sent in this loop turn, written together at its end (_flush)
        self._outgoing: list[bytes] = []
        self.address = ""
        self.origin_host = ""      # the peer's, from its CER
        self.origin_realm = ""
        self.is_open = False
        self._closing = False
        self._pending_in = 0       # its requests being answered
        self._waiting: dict[int, asyncio.Future[Message]] = {}  # ours, by hop-by-hop id
        self._hop_ids = itertools.count(random.getrandbits(31))
        # end-to-end ids: the low 12 bits of the start time in the high 12 (RFC 6733 §3)
        self._end_ids = itertools.count((int(time.time()) & 0xFFF) << 20)
        self._last_heard = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._opened = asyncio.Event()  # set by an accepted CER
        self._upgrading = False    # TLS after CER: the handshake under way
        self._lost = False

    # ------------------------------------------------------------------ the transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a cast, not an isinstance check: uvloop's transports (the server's loop) do not
        # subclass asyncio.Transport, and an assert here refused every connection
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        self._spawn(self._watch())

    def connection_lost(self, exc: Exception | None) -> None:
        # (once: a TLS handshake after CER that fails or is cut ends the peer itself,
        # and the TLS layer may tell the same loss again)
        if self._lost:
            return
        self._lost = True
        self._closing = True
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(PeerGoneError(f"peer {self.origin_host or self.address} gone"))
        self._waiting.clear()
        for task in self._tasks:
            task.cancel()
        if self.is_open:
            self.is_open = False
            self._on_close(self)

    def data_received(self, data: bytes) -> None:
        self._last_heard = time.monotonic()
        self._buffer += data
        while not self._closing and len(self._buffer) >= 4:
            try:
                length = codec.message_length(bytes(self._buffer[:4]))
            except CodecError as error:
                self._frame_lost(error)
                return
            if length > self._rules.max_message_bytes:
                self._frame_lost(CodecError(ResultCode.INVALID_MESSAGE_LENGTH, (
                    f"message of {length} bytes, above max_message_bytes "
                    f"({self._rules.max_message_bytes})")))
                return
            if len(self._buffer) < length:
                return
            frame = bytes(self._buffer[:length])
            del self._buffer[:length]
            self._received(frame)

    def close(self) -> None:
        if self._transport is not None and not self._closing:
            self._closing = True
            self._flush()  # (what was sent before the close goes out before it)
            self._transport.close()

    def send(self, message: Message) -> None:
        """Queues the message's frame; the frames of one loop turn go out in one write.
        Answers finish in bursts (one read of Redis replies completes many), and a write
        each was a send() system call each: ~10 % of the server's time at saturation."""
        if self._transport is not None and not self._transport.is_closing():
            if not self._outgoing:
                asyncio.get_running_loop().call_soon(self._flush)
            self._outgoing.append(m.encode_message(message))

    def _flush(self) -> None:
        if self._upgrading:  # (held: sent in TLS once the handshake is done)
            return
        frames, self._outgoing = self._outgoing, []
        if frames and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(frames))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ incoming
    def _frame_lost(self, error: CodecError) -> None:
        """A header that cannot be read: its answer where the frame can be addressed (20
        bytes of it), then the connection ends (where the next frame starts is unknown)."""
        log.warning("diameter peer %s: %s; closing", self.origin_host or self.address, error)
        if len(self._buffer) >= HEADER_BYTES:
            _, word1, application, hop, end = _HEADER.unpack_from(self._buffer)
            if word1 >> 24 & FLAG_REQUEST:
                request = Message(word1 >> 24, word1 & 0xFFFFFF, application, hop, end, [])
                self.send(self._error_answer(request, error.result_code, str(error)))
        self.close()

    def _received(self, frame: bytes) -> None:
        try:
            message = m.decode_message(frame)
        except CodecError as error:
            self._malformed(frame, error.result_code, str(error), error.failed_avp)
            return
        if not message.is_request:
            self._answered(message)
        elif not self.is_open:
            self._before_open(message)
        else:
            self._request(message)

    def _malformed(self, frame: bytes, code: int, reason: str, failed_avp: bytes) -> None:
        _, word1, application, hop, end = _HEADER.unpack_from(frame)
        if not word1 >> 24 & FLAG_REQUEST:
            log.warning("diameter peer %s: a malformed answer dropped: %s",
                        self.origin_host or self.address, reason)
            return
        request = Message(word1 >> 24, word1 & 0xFFFFFF, application, hop, end, [])
        self.send(self._error_answer(request, code, reason, failed_avp))

    def _error_answer(self, request: Message, code: int, reason: str,
                      failed_avp: bytes = b"") -> Message:
        """An answer with the E flag (a protocol error, RFC 6733 §7.2) or, for the
        application's errors (5xxx), without it; Failed-AVP when an AVP is named."""
        extra = [m.text(AvpCode.ORIGIN_HOST, self._rules.origin_host),
                 m.text(AvpCode.ORIGIN_REALM, self._rules.origin_realm),
                 m.text(AvpCode.ERROR_MESSAGE, reason[:200], mandatory=False)]
        if failed_avp:
            extra.append((AvpCode.FAILED_AVP, AVP_MANDATORY, 0, failed_avp))
        return answer_to(request, code, *extra, error=3000 <= code < 4000)

    def _before_open(self, message: Message) -> None:
        if message.command_code != Command.CAPABILITIES_EXCHANGE:
            log.warning("diameter peer %s: command %d before CER; closing", self.address,
                        message.command_code)
            self.close()
            return
        answer, accepted = self._capabilities(message)
        if accepted and not self._on_open(self):
            answer = self._error_answer(message, ResultCode.TOO_BUSY, (
                "the server holds as many peers as diameter_max_peers allows"))
            accepted = False
        self.send(answer)
        if not accepted:
            self.close()
            return
        self.is_open = True
        self._opened.set()
        if self._rules.tls_after_cer:  # (accepted: so TLS was agreed)
            self._start_tls()

    # ------------------------------------------------------------------ TLS after CER
    def _start_tls(self) -> None:
        """The CEA written out in clear, then reading paused: the bytes that follow are
        the peer's TLS handshake, never to be read as Diameter."""
        assert self._transport is not None
        self._flush()
        if self._buffer:
            # sent before the CEA could be read: not the handshake (that starts on the
            # CEA), and where the TLS stream would begin is unknown
            log.warning("diameter peer %s: data after its CER before the TLS handshake; "
                        "closing", self.origin_host)
            self.close()
            return
        self._transport.pause_reading()
        self._upgrading = True
        self._spawn(self._handshake(self._transport))

    async def _handshake(self, plain: asyncio.Transport) -> None:
        """The server side of the handshake on the connection (the public start_tls:
        asyncio's and uvloop's alike); the Peer goes on over the TLS transport. A
        failure ends this connection only; the CER timeout bounds the handshake too."""
        assert self._rules.tls is not None
        try:
            secure = await asyncio.get_running_loop().start_tls(
                plain, self, self._rules.tls, server_side=True,
                ssl_handshake_timeout=self._rules.cer_timeout_s)
        except (OSError, TimeoutError) as error:  # (ssl.SSLError is an OSError)
            if not self._closing:
                log.warning("diameter peer %s (%s): TLS handshake after CER failed: %s; "
                            "closing", self.origin_host, self.address, error)
            plain.close()
            self.connection_lost(error)
            return
        if secure is None or secure.is_closing() or self._closing:  # (closed meanwhile)
            plain.close()
            self.connection_lost(None)
            return
        self._transport = secure
        self._upgrading = False
        log.info("diameter peer %s: TLS after CER (%s)", self.origin_host,
                 secure.get_extra_info("cipher"))
        self._flush()  # (what was answered meanwhile)

    def _request(self, message: Message) -> None:
        command = message.command_code
        if command == Command.DEVICE_WATCHDOG:
            self.send(answer_to(message, ResultCode.SUCCESS, *self._identity(),
                                m.u32(AvpCode.ORIGIN_STATE_ID, self._rules.origin_state_id)))
        elif command == Command.DISCONNECT_PEER:
            self.send(answer_to(message, ResultCode.SUCCESS, *self._identity()))
            self.close()
        elif command == Command.CAPABILITIES_EXCHANGE:  # (a second CER: RFC 6733 §5.3)
            self.send(self._error_answer(message, ResultCode.UNABLE_TO_COMPLY,
                                         "capabilities already exchanged"))
        elif command != Command.CREDIT_CONTROL:
            self.send(self._error_answer(message, ResultCode.COMMAND_UNSUPPORTED,
                                         f"command {command} is not served here"))
        elif message.application_id != CREDIT_CONTROL_APPLICATION:
            self.send(self._error_answer(message, ResultCode.APPLICATION_UNSUPPORTED,
                                         f"application {message.application_id}"))
        elif self._pending_in >= self._rules.max_pending:
            self.send(self._error_answer(message, ResultCode.TOO_BUSY, (
                f"{self._pending_in} requests of this peer in progress "
                "(diameter_max_pending_per_peer)")))
        else:
            self._pending_in += 1
            self._spawn(self._answer(message))

    async def _answer(self, request: Message) -> None:
        try:
            self.send(await self._handle_request(self, request))
        except AvpError as error:
            self.send(self._error_answer(request, error.result_code, str(error),
                                         error.failed_avp))
        except Exception:
            log.exception("diameter peer %s: request %d failed", self.origin_host,
                          request.hop_by_hop)
            self.send(self._error_answer(request, ResultCode.UNABLE_TO_COMPLY,
                                         "the answer could not be made: retry"))
        finally:
            self._pending_in -= 1

    def _answered(self, answer: Message) -> None:
        future = self._waiting.pop(answer.hop_by_hop, None)
        if future is None:
            log.info("diameter peer %s: an answer to no request of ours (hop-by-hop %d)",
                     self.origin_host or self.address, answer.hop_by_hop)
        elif not future.done():
            future.set_result(answer)

    # ------------------------------------------------------------------ capabilities
    def _identity(self) -> list[Avp]:
        return [m.text(AvpCode.ORIGIN_HOST, self._rules.origin_host),
                m.text(AvpCode.ORIGIN_REALM, self._rules.origin_realm)]

    def _capabilities(self, cer: Message) -> tuple[Message, bool]:
        """The CEA, and whether the peer is accepted (RFC 6733 §5.3, RFC 4006 §1.3)."""
        try:
            host = m.utf8(m.required(cer.avps, AvpCode.ORIGIN_HOST))
            realm = m.utf8(m.required(cer.avps, AvpCode.ORIGIN_REALM))
            security = {m.unsigned32(a) for a in m.find_all(cer.avps,
                                                            AvpCode.INBAND_SECURITY_ID)}
        except AvpError as error:
            return self._error_answer(cer, error.result_code, str(error), error.failed_avp), False
        self.origin_host, self.origin_realm = host, realm
        refusal = self._peer_refusal(host, realm)
        if refusal:
            log.warning("diameter peer %s (%s, %s): refused: %s", self.address, host, realm,
                        refusal)
            return self._error_answer(cer, ResultCode.UNKNOWN_PEER, refusal), False
        if not self._offers_credit_control(cer.avps):
            return self._error_answer(cer, ResultCode.NO_COMMON_APPLICATION,
                                      "no Auth-Application-Id 4 (credit control)"), False
        refusal, agreed = self._inband_security(security)
        if refusal:
            log.warning("diameter peer %s (%s): refused: %s", host, self.address, refusal)
            return self._error_answer(cer, ResultCode.NO_COMMON_SECURITY, refusal), False
        avps = [*self._identity(),
                *(m.address(AvpCode.HOST_IP_ADDRESS, a) for a in self._rules.host_addresses),
                m.u32(AvpCode.VENDOR_ID, VENDOR_ID), m.text(AvpCode.PRODUCT_NAME, PRODUCT_NAME,
                                                      mandatory=False),
                m.u32(AvpCode.ORIGIN_STATE_ID, self._rules.origin_state_id),
                m.u32(AvpCode.AUTH_APPLICATION_ID, CREDIT_CONTROL_APPLICATION), *agreed]
        return answer_to(cer, ResultCode.SUCCESS, *avps), True

    def _inband_security(self, offered: set[int]) -> tuple[str, list[Avp]]:
        """What the CER's Inband-Security-Ids (none: NO_INBAND_SECURITY) leave: a refusal
        (5017), or the CEA's Inband-Security-Id (RFC 6733 §6.10)."""
        rules = self._rules
        if rules.tls is not None and not rules.tls_after_cer:
            return "", []  # TLS from the first byte: the AVP has no say (RFC 6733 §2.1)
        offered = offered or {InbandSecurity.NO_INBAND_SECURITY}
        if rules.tls_after_cer:
            if InbandSecurity.TLS in offered:
                return "", [m.u32(AvpCode.INBAND_SECURITY_ID, InbandSecurity.TLS)]
            # (TLS configured: the operator wants it, a clear connection is not offered)
            return ("Inband-Security-Id TLS (1) not offered: this listener requires TLS "
                    "after CER (diameter_tls_after_cer)"), []
        if InbandSecurity.NO_INBAND_SECURITY in offered:
            return "", []
        return ("only Inband-Security-Id TLS (1) offered: this listener has no TLS after "
                "CER (diameter_tls_after_cer)"), []

    def _peer_refusal(self, host: str, realm: str) -> str:
        rules = self._rules
        if rules.allowed_realms and realm not in rules.allowed_realms:
            return f"realm {realm!r} is not in diameter_peer_realms"
        if not rules.allowed_hosts:
            if _is_loopback(self.address):
                return ""
            return "no diameter_peers configured: only loopback peers are allowed"
        if host not in rules.allowed_hosts:
            return f"Origin-Host {host!r} is not in diameter_peers"
        addresses = rules.allowed_hosts[host]
        if addresses and self.address not in addresses:
            return f"{host!r} may not connect from {self.address}"
        return ""

    @staticmethod
    def _offers_credit_control(avps: list[Avp]) -> bool:
        offered = {m.unsigned32(a) for a in m.find_all(avps, AvpCode.AUTH_APPLICATION_ID)}
        for group in m.find_all(avps, AvpCode.VENDOR_SPECIFIC_APPLICATION_ID):
            offered |= {m.unsigned32(a) for a in m.find_all(m.grouped(group),
                                                            AvpCode.AUTH_APPLICATION_ID)}
        return bool(offered & {CREDIT_CONTROL_APPLICATION, RELAY_APPLICATION})

    # ------------------------------------------------------------------ outgoing
    async def request(self, command: int, application_id: int, avps: list[Avp],
                      timeout_s: float | None = None) -> Message:
        """Sends a request of ours; its answer (PeerGoneError, TimeoutError)."""
        if self._closing or self._transport is None:
            raise PeerGoneError(f"peer {self.origin_host or self.address} gone")
        hop = next(self._hop_ids) & 0xFFFFFFFF
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[hop] = future
        self.send(Message(FLAG_REQUEST | FLAG_PROXIABLE, command, application_id, hop,
                          next(self._end_ids) & 0xFFFFFFFF, avps))
        try:
            return await asyncio.wait_for(future, timeout_s or self._rules.request_timeout_s)
        finally:
            self._waiting.pop(hop, None)

    async def _watch(self) -> None:
        """No CER in time: closed. Then, silent for watchdog_s: a DWR; no answer to it in
        as long: closed (RFC 3539 §3.4, simplified: no failover to do here)."""
        try:
            await asyncio.wait_for(self._opened.wait(), self._rules.cer_timeout_s)
        except TimeoutError:
            log.warning("diameter peer %s: no CER in %s s; closing", self.address,
                        self._rules.cer_timeout_s)
            self.close()
            return
        while not self._closing:
            quiet_s = time.monotonic() - self._last_heard
            if quiet_s < self._rules.watchdog_s:
                await asyncio.sleep(self._rules.watchdog_s - quiet_s)
                continue
            try:
                await self.request(Command.DEVICE_WATCHDOG, BASE_APPLICATION, [
                    *self._identity(), m.u32(AvpCode.ORIGIN_STATE_ID, self._rules.origin_state_id)],
                    timeout_s=self._rules.watchdog_s)
            except (PeerGoneError, TimeoutError):
                log.warning("diameter peer %s: no DWA in %s s; closing", self.origin_host,
                            self._rules.watchdog_s)
                self.close()
                return

    async def disconnect(self, cause: DisconnectCause = DisconnectCause.REBOOTING) -> None:
        """DPR (the server stopping), then closed when answered or after a timeout."""
        if self.is_open:
            with contextlib.suppress(PeerGoneError, TimeoutError):
                await self.request(Command.DISCONNECT_PEER, BASE_APPLICATION, [
                    *self._identity(), m.u32(AvpCode.DISCONNECT_CAUSE, cause)], timeout_s=2.0)
        self.close()
