"""The one way the server talks to Redis: a Transport, chosen once from the settings
(creditline.api.app.transport_for) and handed to the Store and the event hub.

Three kinds, one interface and one reply shape:
- FastScriptClient (fastredis): one Redis server, pipelined over hiredis;
- LeanCluster (here): a Redis Cluster, one FastScriptClient per node, routed by slot;
- RedisPy (here): redis-py's client, where the lean path does not apply (redis_fast_path
  off, or redis-py's own ssl_* URL options).

Replies are RESP as hiredis parses it, in every kind: bulk strings as bytes, integers as
int, arrays as lists, nil as None (redis-py's reply callbacks are not applied). Errors: an
error reply raises fastredis.ReplyError (creditline.errors.ScriptError and redis-py's
ResponseError at once; its text is Redis's), a refused AUTH redis-py's
AuthenticationError; a connection that cannot be opened or is lost raises OSError
(ConnectionError), and no reply within the call timeout TimeoutError (bounded kinds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from creditline.store.fastredis import FastScriptClient, ReplyError

SLOTS = 16384
# MOVED/ASK answers followed for one call before it fails (TRYAGAIN: until its deadline).
MAX_REDIRECTS = 5
# The pause between attempts to reach a node that refused the connection (restarting).
RECONNECT_PAUSE_S = 0.05
# Hash tags remembered with their slot (the partitions' tags, a few hundred at most).
MAX_CACHED_TAGS = 4096

Address = tuple[str, int]


class Transport(Protocol):
    @property
    def cluster(self) -> bool:
        """A Redis Cluster: one script's keys must share a slot."""

    @property
    def bounded(self) -> bool:
        """Every call raises TimeoutError after the call timeout (no timer needed)."""

    def evalsha(self, sha: str, source: str, keys: Sequence[str],
                args: Sequence[int | str | bytes]) -> Awaitable[Any]:
        """A script by its SHA, loaded from source on NOSCRIPT."""

    def fcall(self, function: str, library: str, keys: Sequence[str],
              args: Sequence[int | str | bytes]) -> Awaitable[Any]:
        """A library's function (Redis 7), the library loaded when Redis does not know the
        function."""

    def command(self, key: str, *parts: str | int) -> Awaitable[Any]:
        """One command; key (one the command names) says which node of a cluster."""

    async def aclose(self) -> None: ...


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the hash of Redis Cluster's key slots."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def hash_tag(key: str) -> str:
    """What Redis hashes of a key: the first non-empty {...}, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: str) -> int:
    return crc16(hash_tag(key).encode()) % SLOTS


def _redirect(message: str) -> tuple[str, Address] | None:
    """("MOVED" or "ASK", the node's address) of a redirection, else None."""
    kind, _, rest = message.partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    host, _, port = rest.partition(" ")[2].rpartition(":")
    return kind, (host, int(port))


def slot_map(reply: Sequence[Any], asked: Address) -> list[Address]:
    """CLUSTER SLOTS as the master of each slot; a node that names itself with an empty
    host is the one asked. Slots nobody serves go to the one asked (it redirects)."""
    slots = [asked] * SLOTS
    for start, end, master, *_ in reply:
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        address = (host or asked[0], int(master[1]))
        slots[int(start):int(end) + 1] = [address] * (int(end) - int(start) + 1)
    return slots


class LeanCluster:
    """A Redis Cluster through one FastScriptClient per node: a call goes to the master of
    its key's slot (CRC16 of the hash tag, from CLUSTER SLOTS read at the first call).
    MOVED: the slot's new node is noted and the map read again; ASK (a slot being
    migrated): ASKING then the command, on the node named; TRYAGAIN (a script's keys on both
    sides of a migration): again after a pause. A node that refuses the
    connection (gone, restarting): the map is read again from another node and the call
    tried again until the call timeout, nothing having been sent. A connection lost with a
    call in flight fails that call (Redis may have run it: the caller's retransmission gets
    the stored answer) and the next call reads the map again. AUTH and TLS as on one
    server, on every node."""

    cluster = True
    bounded = True

    def __init__(self, url: str, connect_timeout_s: float, call_timeout_s: float, *,
                 username: str = "", password: str = "", tls: Any = None) -> None:
        parsed = urlparse(url)
        self._scheme = parsed.scheme
        self._seed: Address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self._username = unquote(parsed.username or "") or username
        self._password = unquote(parsed.password or "") or password
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._nodes: dict[Address, FastScriptClient] = {}
        self._slots: list[Address] = []  # empty: to be read
        self._map_version = 0
        self._stale = False  # a node went: read the map before the next call
        self._reading_map = asyncio.Lock()
        self._tag_slots: dict[str, int] = {}

    def slot(self, key: str) -> int:
        tag = hash_tag(key)
        slot = self._tag_slots.get(tag)
        if slot is None:
            slot = crc16(tag.encode()) % SLOTS
            if len(self._tag_slots) < MAX_CACHED_TAGS:
                self._tag_slots[tag] = slot
        return slot

    def _node(self, address: Address) -> FastScriptClient:
        node = self._nodes.get(address)
        if node is None:
            host = f"[{address[0]}]" if ":" in address[0] else address[0]
            node = self._nodes[address] = FastScriptClient(
                f"{self._scheme}://{host}:{address[1]}", self._connect_timeout_s,
                self._call_timeout_s, username=self._username, password=self._password,
                tls=self._tls)
        return node

    async def read_map(self, seen_version: int) -> None:
        """Reads CLUSTER SLOTS from the first node that answers, unless the map was read
        since seen_version (many calls redirected at once read it once)."""
        async with self._reading_map:
            if self._map_version != seen_version:
                return
            failures: list[BaseException] = []
            for address in dict.fromkeys([*self._slots, self._seed]):
                try:
                    reply = await self._node(address).call("CLUSTER", "SLOTS")
                except OSError as error:  # gone: another may answer (a refusal is said)
                    failures.append(error)
                    continue
                self._slots = slot_map(reply, address)
                self._map_version += 1
                self._stale = False
                return
            raise ConnectionError(f"no node of the Redis Cluster answered CLUSTER SLOTS: "
                                  f"{failures[-1]!r}")

    async def _reached(self, slot: int, deadline: float) -> FastScriptClient:
        """The connected client of the slot's master; while the node refuses, the map is
        read again (from any node that answers) and the connection tried again, until the
        deadline."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._stale or not self._slots:
                    await self.read_map(self._map_version)
                node = self._node(self._slots[slot])
                await node.connect()
                return node
            except (OSError, TimeoutError):
                if loop.time() + RECONNECT_PAUSE_S >= deadline:
                    raise
                self._stale = True
            await asyncio.sleep(RECONNECT_PAUSE_S)

    async def _run(self, key: str,
                   send: Callable[[FastScriptClient, bool], Awaitable[Any]]) -> Any:
        slot = self.slot(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._call_timeout_s
        node = None if self._stale or not self._slots else self._nodes.get(self._slots[slot])
        if node is None or not node.connected:
            node = await self._reached(slot, deadline)
        asking = False
        redirects = 0
        while redirects < MAX_REDIRECTS:
            try:
                return await send(node, asking)
            except ResponseError as error:
                redirect = _redirect(str(error))
                if redirect is None:
                    # TRYAGAIN: a script's keys not all on one side of a slot's migration
                    # (Redis runs it once the slot has moved)
                    if not str(error).startswith("TRYAGAIN") or loop.time() >= deadline:
                        raise
                    await asyncio.sleep(RECONNECT_PAUSE_S)
                    continue
                redirects += 1
                kind, address = redirect
                asking = kind == "ASK"
                if not asking:  # the slot moved for good: read the whole map
                    await self.read_map(self._map_version)
                    self._slots[slot] = address  # the old owner's word is the newest
            except ConnectionError:
                self._stale = True  # the node went: the next call reads the map again
                raise
            node = self._node(address)
        raise ReplyError(f"Redis Cluster: slot {slot} redirected {MAX_REDIRECTS} times")

    def evalsha(self, sha: str, source: str, keys: Sequence[str],
                args: Sequence[int | str | bytes]) -> Awaitable[Any]:
        return self._run(keys[0] if keys else "", lambda node, asking: node.evalsha(
            sha, source, keys, args, asking=asking))

    def fcall(self, function: str, library: str, keys: Sequence[str],
              args: Sequence[int | str | bytes]) -> Awaitable[Any]:
        # (each node loads the library at its first call that finds it missing)
        return self._run(keys[0] if keys else "", lambda node, asking: node.fcall(
            function, library, keys, args, asking=asking))

    def command(self, key: str, *parts: str | int) -> Awaitable[Any]:
        return self._run(key, lambda node, asking: node.call(*parts, asking=asking))

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()
        self._nodes.clear()


def _as_sent(response: Any, **_: Any) -> Any:
    return response


# The commands the server sends through command() whose replies redis-py would reshape.
_RESHAPED = ("XREAD", "XRANGE", "XREVRANGE", "ZRANGEBYSCORE", "HMGET")


class RedisPy:
    """redis-py's client as a Transport: a client of its own, speaking RESP2 (redis-py 8
    asks for RESP3 by default, whose maps the lean path never sees), its reply callbacks
    for the commands above set to give the reply as sent."""

    bounded = False

    def __init__(self, redis: Redis | RedisCluster) -> None:
        self._redis = redis
        self.cluster = isinstance(redis, RedisCluster)
        for name in _RESHAPED:
            redis.set_response_callback(name, _as_sent)

    async def evalsha(self, sha: str, source: str, keys: Sequence[str],
                      args: Sequence[int | str | bytes]) -> Any:
        try:
            try:
                return await self._redis.execute_command(
                    "EVALSHA", sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._redis.script_load(source)
                return await self._redis.execute_command(
                    "EVALSHA", sha, len(keys), *keys, *args)
        except ResponseError as error:
            raise ReplyError(str(error)) from error

    async def fcall(self, function: str, library: str, keys: Sequence[str],
                    args: Sequence[int | str | bytes]) -> Any:
        command = ("FCALL", function, len(keys), *keys, *args)
        try:
            try:
                return await self._redis.execute_command(*command)
            except ResponseError as error:
                if "Function not found" not in str(error):
                    raise
            if isinstance(self._redis, RedisCluster):  # on every primary: any may need it
                await self._redis.execute_command("FUNCTION", "LOAD", "REPLACE", library,
                                                  target_nodes=RedisCluster.PRIMARIES)
            else:
                await self._redis.function_load(library, replace=True)
            return await self._redis.execute_command(*command)
        except ResponseError as error:
            raise ReplyError(str(error)) from error

    async def command(self, key: str, *parts: str | int) -> Any:
        try:
            return await self._redis.execute_command(*parts)
        except ResponseError as error:
            raise ReplyError(str(error)) from error

    async def aclose(self) -> None:
        await self._redis.aclose()
