"""A lean pipelined path for the charging script: EVALSHA written straight to the socket
as RESP, replies parsed by hiredis, every call of one event-loop turn sent in one write.
It is the Transport (store/transport.py) on one server; each of the hub's readers has one.

Why not redis-py here: on this machine kind one EVALSHA through redis.asyncio halves what a
server process can answer (2,800 req/s against the gRPC floor of 5,500), while this path
keeps 86 % of it (4,700; bench/README.md). It serves the charging
script on one Redis server, over TCP (redis://), TLS (rediss://) or a unix socket (unix://,
the embedded Redis), with AUTH (a password, or an ACL user and password) and SELECT sent on
every new connection before anything else. On Redis Cluster one of these per node serves
store/transport.py's LeanCluster (slot routing, MOVED and ASK).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.exceptions import AuthenticationError, ResponseError

from creditline.errors import ScriptError


class ReplyError(ScriptError, ResponseError):
    """An error reply: a ScriptError of Creditline's tree, and redis-py's ResponseError,
    so that the callers catching RedisError catch it as they catch redis-py's."""


def _pack(*parts: str | int | bytes) -> bytes:
    # hiredis's type stub declares a one-element tuple; the function takes any length
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]
    return packed


def _greeting(username: str, password: str, db: int) -> tuple[tuple[str, bytes], ...]:
    """The commands a new connection sends first, by name: AUTH [user] password when
    there are credentials (a user alone sends an empty password, as redis-py does), SELECT
    when the database is not 0."""
    commands: list[tuple[str, bytes]] = []
    if username or password:
        credentials = (username, password) if username else (password,)
        commands.append(("AUTH", _pack("AUTH", *credentials)))
    if db:
        commands.append(("SELECT", _pack("SELECT", db)))
    return tuple(commands)


_ASKING = _pack("ASKING")


def _ignore_reply(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # read, so that a failed ASKING is not logged as unretrieved


class _Connection(asyncio.Protocol):
    """One Redis connection: requests in order, replies matched to them in order.

    Every request has a deadline (now + call_timeout_s); one timer for the connection, not
    one per request, fails those past it with TimeoutError. The deadlines follow the send
    order, so the failed requests are always the oldest ones (a prefix of `_waiting`); a
    reply that comes after its deadline is skipped."""

    def __init__(self, call_timeout_s: float) -> None:
        # asyncio.get_running_loop() costs a getpid() system call on Python 3.11: the
        # connection keeps the loop it was made in (it is used in no other)
        self._loop = asyncio.get_running_loop()
        self._call_timeout_s = call_timeout_s
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._expired = 0  # how many of the oldest waiting requests have been failed
        self._watchdog: asyncio.TimerHandle | None = None
        self._outgoing: list[bytes] = []
        self._transport: asyncio.WriteTransport | None = None
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        self._transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future, _ = self._waiting.popleft()
            if self._expired:
                self._expired -= 1
            if not future.done():  # a caller past its deadline or gone skips its reply
                future.set_result(reply)

    def connection_lost(self, error: Exception | None) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"redis connection lost: {error!r}"))

    def _expire(self) -> None:
        self._watchdog = None
        now = self._loop.time()
        for future, deadline in itertools.islice(self._waiting, self._expired, None):
            if deadline > now:
                self._watchdog = self._loop.call_at(deadline, self._expire)
                return
            self._expired += 1
            if not future.done():
                future.set_exception(TimeoutError(
                    f"redis did not answer within {self._call_timeout_s} s"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise ConnectionError("redis connection closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        deadline = self._loop.time() + self._call_timeout_s
        self._waiting.append((future, deadline))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._expire)
        self._outgoing.append(command)
        if not self._flush_scheduled:
            # everything asked for during this loop turn leaves in one write
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def tls_context(ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """The TLS set-up of a rediss:// connection, as redis-py builds its own (the server's
    certificate required, its host name checked, the system's CAs and ca_file trusted):
    the start check goes through redis-py, so both must accept the same server. A client
    certificate when cert_file is given."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


class FastScriptClient:
    """EVALSHA over one pipelined connection, reconnecting when it is lost. Every call is
    bounded: TimeoutError after call_timeout_s without a reply, so its callers need no
    timer of their own.

    username and password: AUTH on every new connection; a user or password in the URL
    wins, as redis-py reads them. tls: the context for a rediss:// URL (tls_context()'s
    defaults without one)."""

    def __init__(self, url: str, connect_timeout_s: float, call_timeout_s: float, *,
                 username: str = "", password: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        parsed = urlparse(url)
        self._socket_path = parsed.path if parsed.scheme == "unix" else ""
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._tls = (tls or tls_context()) if parsed.scheme == "rediss" else None
        # the database: redis://host/<db>, unix:///path?db=<db> (as redis-py reads them)
        db = parse_qs(parsed.query).get("db", ["0"])[0] if self._socket_path \
            else parsed.path.lstrip("/")
        self._greeting = _greeting(unquote(parsed.username or "") or username,
                                   unquote(parsed.password or "") or password, int(db or 0))
        self._connect_timeout_s = connect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    @staticmethod
    def usable_for(url: str, cluster: bool) -> bool:
        """A URL this client reads whole: a rediss:// URL with ssl_* options (redis-py's
        own TLS settings, which tls_context does not read) stays on redis-py, and so does a
        cluster behind a unix socket (its nodes name each other by host and port)."""
        parsed = urlparse(url)
        tls_options = parsed.scheme == "rediss" and any(
            name.startswith("ssl_") for name in parse_qs(parsed.query))
        return parsed.scheme in ("redis", "rediss", "unix") and not tls_options \
            and not (cluster and parsed.scheme == "unix")

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    async def connect(self) -> None:
        """Opens (and greets) the connection unless it is open: a failure here means no
        command was sent, so the cluster client may try another node."""
        await self._connected()

    async def _connected(self) -> _Connection:
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        async with self._connecting:
            if self._connection is None or self._connection.closed:
                _, fresh = await asyncio.wait_for(self._open(), self._connect_timeout_s)
                try:
                    await self._greet(fresh)
                except BaseException:
                    fresh.close()  # refused (or cancelled) before its first call
                    raise
                self._connection = fresh
            return self._connection

    async def _greet(self, fresh: _Connection) -> None:
        """AUTH and SELECT, before any other command: both in one write, one round trip.
        Their replies are awaited together so that none is left unread (an exception in a
        future nobody awaits is logged as never retrieved)."""
        if not self._greeting:
            return
        replies = await asyncio.gather(*(fresh.send(command) for _, command in self._greeting))
        for (name, _), reply in zip(self._greeting, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                # Redis's refusal (WRONGPASS ..., NOAUTH ...) never repeats the password
                error = AuthenticationError if name == "AUTH" else ReplyError
                raise error(f"redis refused {name} on the lean connection: {reply}")

    async def _open(self) -> tuple[asyncio.BaseTransport, _Connection]:
        loop = asyncio.get_running_loop()
        if self._socket_path:
            return await loop.create_unix_connection(
                lambda: _Connection(self._call_timeout_s), self._socket_path)
        if self._tls is not None:
            return await loop.create_connection(
                lambda: _Connection(self._call_timeout_s), self._host, self._port,
                ssl=self._tls, server_hostname=self._host)
        return await loop.create_connection(
            lambda: _Connection(self._call_timeout_s), self._host, self._port)

    @staticmethod
    async def _checked(reply: asyncio.Future[Any]) -> Any:
        value = await reply
        if isinstance(value, hiredis.ReplyError):
            raise ReplyError(str(value))
        return value

    @staticmethod
    def _send(connection: _Connection, command: bytes, asking: bool) -> asyncio.Future[Any]:
        if asking:  # ASKING just before the command, on its connection (a cluster's ASK)
            connection.send(_ASKING).add_done_callback(_ignore_reply)
        return connection.send(command)

    def evalsha(self, sha: str, source: str, keys: Sequence[str],
                args: Sequence[int | str | bytes], *, asking: bool = False) -> Awaitable[Any]:
        """Runs a script by its SHA; loads it first if Redis does not know it (NOSCRIPT,
        e.g. after a restart) and runs it again."""
        return self._script(_pack("EVALSHA", sha, len(keys), *keys, *args), "NOSCRIPT",
                            ("SCRIPT", "LOAD", source), asking)

    def fcall(self, function: str, library: str, keys: Sequence[str],
              args: Sequence[int | str | bytes], *, asking: bool = False) -> Awaitable[Any]:
        """Runs a library's function; loads the library first if Redis does not know the
        function (e.g. after a restart, or on a cluster's node that has not seen it)."""
        return self._script(_pack("FCALL", function, len(keys), *keys, *args),
                            "ERR Function not found", ("FUNCTION", "LOAD", "REPLACE", library),
                            asking)

    async def _script(self, command: bytes, unknown: str, load: tuple[str, ...],
                      asking: bool) -> Any:
        """A script call; `load` sent and the call again when the reply starts `unknown`."""
        connection = self._connection
        if connection is None or connection.closed:  # no coroutine call when connected
            connection = await self._connected()
        reply = await self._send(connection, command, asking)
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith(unknown):
            await self._checked(connection.send(_pack(*load)))
            reply = await self._send(connection, command, asking)
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def call(self, *parts: str | int, asking: bool = False) -> Any:
        """Any one command on this client's connection, its reply as hiredis gives it. A
        blocking command (XREAD BLOCK) holds the connection: give it a client of its own."""
        connection = await self._connected()
        return await self._checked(self._send(connection, _pack(*parts), asking))

    # The Transport interface (store/transport.py): one server, so the key routes nothing.
    cluster = False
    bounded = True

    def command(self, key: str, *parts: str | int) -> Awaitable[Any]:
        return self.call(*parts)

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
