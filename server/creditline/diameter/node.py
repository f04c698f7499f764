"""The Diameter listener beside the gRPC one: its peers, and Gy onto the charging core.

With `workers` > 1 every worker listens on the same port (SO_REUSEPORT, as the gRPC
listener): a peer's connection, and so its sessions, stay with the worker the kernel gave
it to.

The transport is TCP, or SCTP where the OS has it (`diameter_transport`, sctp.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

from creditline.api.interceptors import DiameterObserver
from creditline.api.service import ChargingService
from creditline.diameter.gy import GyApplication, GyRules, IdentityLookup
from creditline.diameter.message import Message
from creditline.diameter.peer import Peer, PeerRules
from creditline.diameter.push import NetworkPush
from creditline.diameter.sctp import StreamListener, sctp_listener
from creditline.errors import SettingsError
from creditline.events.hub import EventHub
from creditline.settings import Settings

log = logging.getLogger(__name__)


def peer_rules(settings: Settings, host_addresses: tuple[str, ...]) -> PeerRules:
    allowed: dict[str, frozenset[str]] = {}
    for entry in filter(None, (e.strip() for e in settings.diameter_peers.split(","))):
        host, _, address = entry.partition("@")
        allowed[host] = allowed.get(host, frozenset()) | ({address} if address else set())
    realms = frozenset(filter(None, (r.strip() for r in settings.diameter_peer_realms.split(","))))
    return PeerRules(
        origin_host=settings.diameter_origin_host, origin_realm=settings.diameter_origin_realm,
        host_addresses=host_addresses, allowed_hosts=allowed, allowed_realms=realms,
        max_message_bytes=settings.diameter_max_message_bytes,
        max_pending=settings.diameter_max_pending_per_peer,
        watchdog_s=settings.diameter_watchdog_s, cer_timeout_s=settings.diameter_cer_timeout_s,
        request_timeout_s=settings.diameter_request_timeout_s,
        # (a new value at every start: RFC 6733 §8.16)
        origin_state_id=int(time.time()) & 0xFFFFFFFF,
        tls=tls_context(settings), tls_after_cer=settings.diameter_tls_after_cer)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS, TLS 1.2 at least (RFC 6733 §13): from the connection's first byte
    (§2.1), or after the CEA with diameter_tls_after_cer; peers' certificates required
    when a client CA is given."""
    if not settings.diameter_tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.diameter_tls_cert_file, settings.diameter_tls_key_file)
    if settings.diameter_tls_client_ca_file:
        context.load_verify_locations(settings.diameter_tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class DiameterNode:
    def __init__(self, settings: Settings, charging: ChargingService,
                 identities: IdentityLookup, hub: EventHub,
                 observe: DiameterObserver | None = None) -> None:
        self._settings = settings
        host, _, port = settings.diameter_listen.rpartition(":")
        self._host, self._port = host.strip("[]") or "0.0.0.0", int(port)
        self._rules = peer_rules(settings, (self._advertised(),))
        self.gy = GyApplication(charging, identities, GyRules(
            origin_host=settings.diameter_origin_host,
            origin_realm=settings.diameter_origin_realm,
            identity_fallback=settings.diameter_identity_fallback,
            currency_code=settings.diameter_currency_code,
            max_sessions=settings.diameter_max_sessions), observe)
        self.push = NetworkPush(hub, self.gy, settings.diameter_origin_host,
                                settings.diameter_origin_realm)
        self.peers: set[Peer] = set()   # open ones (after CER)
        self._server: asyncio.Server | StreamListener | None = None
        self.port = 0

    def _advertised(self) -> str:
        """Host-IP-Address of the CEA: the listening address, or loopback for a wildcard."""
        if self._host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        try:
            return socket.gethostbyname(self._host)
        except OSError:
            return "127.0.0.1"

    async def start(self) -> int:
        # (TLS after CER: the listener is plain, each Peer starts TLS after its CEA)
        tls = None if self._rules.tls_after_cer else self._rules.tls
        try:
            self._server = await self._listen(tls)
        except OSError as error:  # (a port taken, an address not here: as gRPC's is said)
            raise SettingsError(f"setting diameter_listen: cannot listen on "
                                f"{self._settings.diameter_listen}: {error}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        await self.push.start()
        log.info("diameter listening on %s:%d (%s%s) as %s (realm %s)", self._host, self.port,
                 self._settings.diameter_transport,
                 ", TLS after CER" if self._rules.tls_after_cer else ", TLS" if tls else "",
                 self._rules.origin_host, self._rules.origin_realm)
        return self.port

    async def _listen(self, tls: ssl.SSLContext | None) -> asyncio.Server | StreamListener:
        reuse_port = self._settings.workers != 1
        if self._settings.diameter_transport == "sctp":  # (no TLS there: Settings)
            return StreamListener(sctp_listener(self._host, self._port, reuse_port),
                                  self._new_peer)
        return await asyncio.get_running_loop().create_server(
            self._new_peer, self._host, self._port, ssl=tls, reuse_port=reuse_port or None)

    async def stop(self) -> None:
        """DPR to every peer (DO_NOT_WANT_TO_TALK_TO_YOU would keep them away: REBOOTING
        says come back), then the listener closed."""
        await self.push.stop()
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(peer.disconnect() for peer in list(self.peers)),
                             return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _new_peer(self) -> Peer:
        return Peer(self._rules, self._answer, self._opened, self._closed)

    async def _answer(self, peer: Peer, request: Message) -> Message:
        return await self.gy.answer(peer, request)

    def _opened(self, peer: Peer) -> bool:
        if len(self.peers) >= self._settings.diameter_max_peers:
            log.warning("diameter peer %s refused: %d peers (diameter_max_peers)",
                        peer.origin_host, len(self.peers))
            return False
        self.peers.add(peer)
        log.info("diameter peer %s (%s) open from %s", peer.origin_host, peer.origin_realm,
                 peer.address)
        return True

    def _closed(self, peer: Peer) -> None:
        self.peers.discard(peer)
        log.info("diameter peer %s closed", peer.origin_host)
