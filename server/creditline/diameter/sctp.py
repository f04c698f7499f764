"""SCTP for the Diameter listener (RFC 6733 §2.1), where the OS has it.

A one-to-one SCTP socket (RFC 6458 §4: SOCK_STREAM, one association each) carries a byte
stream, which the Diameter framing reads as it reads TCP's. Why not
`loop.create_server(sock=...)`: uvloop (the server's loop) makes every accepted AF_INET
socket a libuv TCP handle, which sets TCP_NODELAY on it; an SCTP socket refuses that option
(ENOPROTOOPT), and no connection ever reaches its protocol (uvloop issue #467). So the
listener accepts with `loop.sock_accept`, and each connection is a StreamSocketTransport
on `add_reader`/`add_writer`, which both loops have for any socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import cast

from creditline.errors import SettingsError

log = logging.getLogger(__name__)
READ_BYTES = 65536
ACCEPT_RETRY_S = 0.1  # after a failed accept (EMFILE: no descriptor left), the next try


def sctp_listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening one-to-one SCTP socket, bound. An OS without SCTP (Linux without the
    sctp module: EPROTONOSUPPORT) makes the setting one that cannot work: said so."""
    family = socket.AF_INET6 if _is_ipv6(host) else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    except OSError as error:
        if error.errno in (errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT, errno.EAFNOSUPPORT):
            raise SettingsError(
                f"setting diameter_transport sctp: this OS has no SCTP (errno {error.errno} "
                f"{error.strerror}); load the sctp kernel module (modprobe sctp) or use "
                f"tcp") from None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # (the workers share the port, as over TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class StreamListener:
    """Accepts on a listening stream socket, a StreamSocketTransport and a protocol from
    `factory` for each connection; `sockets`, `close` and `wait_closed` as asyncio.Server's."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        self.sockets = (sock,)
        self._factory = factory
        self._task = asyncio.ensure_future(self._accept(sock))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, _ = await loop.sock_accept(sock)
            except OSError as error:  # (that connection only: the listener goes on)
                log.warning("diameter listener: accept failed: %s", error)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            connection.setblocking(False)
            StreamSocketTransport(loop, connection, self._factory())

    def close(self) -> None:
        self._task.cancel()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sockets[0].close()


class StreamSocketTransport(asyncio.Transport):
    """A connected stream socket as a transport: what Peer uses of one (write, close,
    pause/resume reading, peername), on the loop's add_reader and add_writer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: asyncio.Protocol) -> None:
        super().__init__({"socket": sock, "peername": sock.getpeername(),
                          "sockname": sock.getsockname()})
        self._loop, self._sock, self._protocol = loop, sock, protocol
        self._fd = sock.fileno()
        self._pending = bytearray()  # written, not yet taken by the socket
        self._reading = self._closing = self._finished = False
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # ------------------------------------------------------------------ reading
    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail(error)
            return
        if data:
            self._protocol.data_received(data)
        elif not self._protocol.eof_received():  # (the peer closed: so do we)
            self.close()

    # ------------------------------------------------------------------ writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._pending:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self._fail(error)
                return
            if sent == len(data):
                return
            self._loop.add_writer(self._fd, self._write_ready)
            data = memoryview(data)[sent:]
        self._pending += data

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail(error)
            return
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def get_write_buffer_size(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ closing
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """What was written goes out first, then the connection closes."""
        if self._closing:
            return
        self.pause_reading()
        self._closing = True
        if not self._pending:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._fail(None)

    def _fail(self, error: Exception | None) -> None:
        self.pause_reading()
        self._closing = True
        self._pending.clear()
        self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._finish, error)

    def _finish(self, error: Exception | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._protocol.connection_lost(error)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol
