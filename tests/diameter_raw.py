"""A Diameter peer byte by byte, for what a well-behaved implementation never sends:
requests before CER, unknown mandatory AVPs, frames that cannot be read. Messages are
built with the codec (tests/test_diameter_codec.py holds it to python-diameter and
tshark), so only what each test breaks on purpose is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl

from creditline.diameter import message as dm
from creditline.diameter.codec import FLAG_PROXIABLE, FLAG_REQUEST, Avp
from creditline.diameter.dictionary import CREDIT_CONTROL_APPLICATION, AvpCode, Command
from creditline.diameter.message import Message

READ_TIMEOUT_S = 10.0
_hops = itertools.count(1)


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 origin_host: str) -> None:
        self.reader, self.writer = reader, writer
        self.origin_host = origin_host

    @classmethod
    async def connect(cls, port: int, origin_host: str = "raw.test",
                      tls: ssl.SSLContext | None = None, sctp: bool = False) -> RawPeer:
        if not sctp:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
            return cls(reader, writer, origin_host)
        # a one-to-one SCTP socket: to asyncio a byte stream like TCP's
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, ssl=tls,
                                                       server_hostname="127.0.0.1" if tls else None)
        return cls(reader, writer, origin_host)

    async def start_tls(self, tls: ssl.SSLContext) -> None:
        """The client's TLS handshake on the open connection (TLS after CER)."""
        await self.writer.start_tls(tls, server_hostname="127.0.0.1")

    def identity(self) -> list[Avp]:
        return [dm.text(AvpCode.ORIGIN_HOST, self.origin_host),
                dm.text(AvpCode.ORIGIN_REALM, "raw")]

    def request(self, command: int, avps: list[Avp],
                application: int = CREDIT_CONTROL_APPLICATION) -> bytes:
        hop = next(_hops)
        return dm.encode_message(Message(FLAG_REQUEST | FLAG_PROXIABLE, command, application,
                                         hop, hop, avps))

    def cer(self, applications: tuple[int, ...] = (CREDIT_CONTROL_APPLICATION,),
            security: tuple[int, ...] = ()) -> bytes:
        """A CER offering the applications and the Inband-Security-Ids (none: the AVP
        left out)."""
        return self.request(Command.CAPABILITIES_EXCHANGE, [
            *self.identity(), dm.address(AvpCode.HOST_IP_ADDRESS, "127.0.0.1"),
            dm.u32(AvpCode.VENDOR_ID, 0), dm.text(AvpCode.PRODUCT_NAME, "raw"),
            *(dm.u32(AvpCode.INBAND_SECURITY_ID, s) for s in security),
            *(dm.u32(AvpCode.AUTH_APPLICATION_ID, a) for a in applications)], application=0)

    def watchdog(self) -> bytes:
        return self.request(Command.DEVICE_WATCHDOG, self.identity(), 0)

    async def open(self) -> Message:
        """CER sent, its CEA read."""
        return await self.exchange(self.cer())

    async def exchange(self, frame: bytes) -> Message:
        await self.send(frame)
        return await self.read()

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        await self.writer.drain()

    async def read(self) -> Message:
        head = await asyncio.wait_for(self.reader.readexactly(4), READ_TIMEOUT_S)
        length = int.from_bytes(head[1:4], "big")
        rest = await asyncio.wait_for(self.reader.readexactly(length - 4), READ_TIMEOUT_S)
        return dm.decode_message(head + rest)

    async def closed_by_server(self) -> bool:
        """True when the server closes the connection (what is left unread is skipped)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), READ_TIMEOUT_S):
                pass
        except (ConnectionResetError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def result_code(message: Message) -> int:
    avp = dm.find(message.avps, AvpCode.RESULT_CODE)
    assert avp is not None, message
    return dm.unsigned32(avp)


def ccr_avps(session_id: str, request_type: int, number: int, subscription: str,
             *blocks: Avp, origin_host: str = "raw.test") -> list[Avp]:
    return [dm.text(AvpCode.SESSION_ID, session_id), dm.text(AvpCode.ORIGIN_HOST, origin_host),
            dm.text(AvpCode.ORIGIN_REALM, "raw"),
            dm.text(AvpCode.DESTINATION_REALM, "localdomain"),
            dm.u32(AvpCode.AUTH_APPLICATION_ID, CREDIT_CONTROL_APPLICATION),
            dm.text(AvpCode.SERVICE_CONTEXT_ID, "32251@3gpp.org"),
            dm.u32(AvpCode.CC_REQUEST_TYPE, request_type),
            dm.u32(AvpCode.CC_REQUEST_NUMBER, number),
            dm.group(AvpCode.SUBSCRIPTION_ID, [dm.u32(AvpCode.SUBSCRIPTION_ID_TYPE, 0),
                                               dm.text(AvpCode.SUBSCRIPTION_ID_DATA,
                                                       subscription)]),
            *blocks]


def sms_debit(count: int) -> Avp:
    """An MSCC of `count` SMS (rating group 300) requested."""
    return _sms(AvpCode.REQUESTED_SERVICE_UNIT, count)


def sms_used(count: int) -> Avp:
    """An MSCC reporting `count` SMS (rating group 300) used."""
    return _sms(AvpCode.USED_SERVICE_UNIT, count)


def _sms(units: int, count: int) -> Avp:
    return dm.group(AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL, [
        dm.group(units, [dm.u64(AvpCode.CC_SERVICE_SPECIFIC_UNITS, count)]),
        dm.u32(AvpCode.RATING_GROUP, 300)])
