"""Redis access: key names, the Lua scripts, and the calls that run them.

Every key of an account carries the account id as its hash tag (`cl:{<account>}:...`), so
each script touches one hash slot and runs unchanged on Redis Cluster. Scripts are loaded
once and called with EVALSHA; redis-py's Script reloads them on NOSCRIPT (e.g. after a
Redis restart) and retries.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

# One Redis server, or a Redis Cluster: every script touches one hash slot either way.
RedisClient = Redis | RedisCluster
if TYPE_CHECKING:
    from creditline.fastredis import FastScriptClient
    from creditline.telemetry import ScriptInstrument

KEY_PREFIX = "cl"
# How many unit buckets one account may hold: the charging script reads them all.
MAX_BUCKETS_PER_ACCOUNT = 32
# Where the partition count of a deployment is recorded: changing it would move every
# account to another partition, so a server with another count refuses to start.
META_KEY = f"{KEY_PREFIX}:meta"


def recorded_partitions(redis: SyncRedis) -> int:
    """The partition count the server recorded in this Redis (for offline tools)."""
    value = redis.hget(META_KEY, "partitions")
    if value is None:
        raise ValueError("this Redis holds no Creditline data (no partition count recorded)")
    return int(value)


def partition_of(account_id: str, partitions: int) -> int:
    """The partition of an account: stable, and the same in every process."""
    return zlib.crc32(account_id.encode()) % partitions


def partition_tag(partition: int) -> str:
    return f"{KEY_PREFIX}:{{{partition}}}"


def events_key(partition: int) -> str:
    return f"{partition_tag(partition)}:events"


def event_counter_key(partition: int) -> str:
    return f"{partition_tag(partition)}:events:n"


def deadlines_key(partition: int) -> str:
    return f"{partition_tag(partition)}:deadlines"


def cdrs_key(partition: int) -> str:
    return f"{partition_tag(partition)}:cdrs"


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """The keys of one account. They share the hash tag of the account's partition, so a
    script touches one hash slot (Redis Cluster), and the partition's event and CDR
    streams can be written in the same atomic step."""

    partition: int
    prefix: str

    @property
    def account(self) -> str:
        return f"{self.prefix}:acct"

    @property
    def buckets(self) -> str:
        return f"{self.prefix}:buckets"

    @property
    def usage(self) -> str:
        return f"{self.prefix}:usage"

    @property
    def open_sessions(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def final_sessions(self) -> str:
        return f"{self.prefix}:final"

    @property
    def top_ups(self) -> str:
        return f"{self.prefix}:topups"

    @property
    def rates(self) -> str:
        return f"{self.prefix}:rates"

    @property
    def adjustments(self) -> str:
        return f"{self.prefix}:adjustments"

    @property
    def events(self) -> str:
        return events_key(self.partition)

    @property
    def cdrs(self) -> str:
        return cdrs_key(self.partition)

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:s:{session_id}"

    def event(self, session_id: str) -> str:
        return f"{self.prefix}:e:{session_id}"


def account_keys(account_id: str, partitions: int) -> AccountKeys:
    partition = partition_of(account_id, partitions)
    return AccountKeys(partition, f"{partition_tag(partition)}:a:{account_id}")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    partitions: int
    answer_retention_s: int
    events_max_length: int        # per partition stream, approximate
    events_retention_s: int       # 0: keep by length only
    spike_fast_window_s: int
    spike_slow_window_s: int
    spike_factor: float           # 0: no spike detection


def _script_source(name: str) -> str:
    return resources.files("creditline").joinpath("lua", name).read_text(encoding="utf-8")


# A unit bucket's value in the buckets hash, field by field ("|"-separated), as charge.lua
# and admin.lua write it (tests/test_money_rules.py holds the scripts to it).
BUCKET_FIELDS = ("rating_group", "remaining", "expires_at_s", "priority", "initial",
                 "unit_kind", "serial", "reserved")


@dataclass(frozen=True, slots=True)
class StoredBucket:
    rating_group: int
    remaining: int
    expires_at_s: int
    priority: int
    initial: int
    unit_kind: str
    serial: int
    reserved: int


def parse_bucket(value: str) -> StoredBucket:
    """A bucket's value (BUCKET_FIELDS, the fields of StoredBucket in order)."""
    parts = value.split("|")
    if len(parts) != len(BUCKET_FIELDS):
        raise ValueError(f"bucket value {value!r}: not the fields {'|'.join(BUCKET_FIELDS)}")
    rg, remaining, expires, priority, initial, unit_kind, serial, reserved = parts
    return StoredBucket(int(rg), int(remaining), int(expires), int(priority), int(initial),
                        unit_kind, int(serial), int(reserved))


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    account: dict[str, str]
    buckets: dict[str, str]
    usage: dict[str, str]
    open_sessions: int


@dataclass(frozen=True, slots=True)
class AdminResult:
    """An admin.lua answer: "OK", "DUPLICATE" (a top-up or adjustment id applied before
    with the same amount) or the refusal ("UNKNOWN", "EXISTS", "TOO_MANY_BUCKETS",
    "CONFLICT|<amount applied first>", "UNAFFORDABLE|<available>"), and the account when
    there is one."""

    status: str
    account: AccountSnapshot | None


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def text(value: Any) -> str:
    """A Redis reply as str (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    """The charging and admin scripts bound to one Redis client."""

    def __init__(self, redis: RedisClient, config: StoreConfig,
                 instrument: ScriptInstrument | None = None,
                 fast: FastScriptClient | None = None) -> None:
        self._redis = redis
        self.config = config
        # the lean pipelined path for the charging script (None: redis-py for everything)
        self._fast = fast
        self._charge_source = _script_source("charge.lua")
        # a span and a latency sample per script call; None (telemetry off): nothing
        self._instrument = instrument
        self._charge: AsyncScript = redis.register_script(self._charge_source)
        self._admin: AsyncScript = redis.register_script(_script_source("admin.lua"))
        self._spike = f"{config.spike_fast_window_s},{config.spike_slow_window_s}," \
            f"{config.spike_factor}"

    def keys(self, account_id: str) -> AccountKeys:
        return account_keys(account_id, self.config.partitions)

    async def check_partitions(self) -> None:
        """Records the partition count on first use; refuses another one later."""
        await self._redis.hsetnx(META_KEY, "partitions", self.config.partitions)
        recorded = int(await self._redis.hget(META_KEY, "partitions") or 0)
        if recorded != self.config.partitions:
            raise ValueError(
                f"setting partitions: this Redis holds data for {recorded} partitions, "
                f"not {self.config.partitions}; the count cannot change once data exists")

    def _event_trim(self, now_ms: int) -> str:
        if self.config.events_retention_s > 0:
            return f"MINID,{now_ms - self.config.events_retention_s * 1000}"
        return f"MAXLEN,{self.config.events_max_length}"

    async def charge(
        self, kind: str, account_id: str, session_id: str, request_number: int,
        now_ms: int, event_time_ms: int, event_action: str, blocks: list[int | str],
        supervision_ms: int = 0, refund_of: str = "",
    ) -> str:
        """Runs one charging request (kind I/U/T/E/S); returns the script's answer.
        refund_of: a REFUND's session id of the charge it reverses."""
        keys = self.keys(account_id)
        request_key = keys.event(session_id) if kind == "E" else keys.session(session_id)
        script_keys = [keys.account, request_key, keys.buckets, keys.usage, keys.open_sessions,
                       keys.final_sessions, keys.events, keys.cdrs, keys.rates,
                       event_counter_key(keys.partition), deadlines_key(keys.partition)]
        if refund_of:
            script_keys += [keys.event(refund_of), keys.session(refund_of)]
        script_args: list[int | str] = [
            kind, request_number, account_id, session_id, now_ms, event_time_ms,
            self.config.answer_retention_s, event_action, self._event_trim(now_ms),
            self._spike, supervision_ms, refund_of, *blocks]
        call = (self._fast.evalsha(self._charge.sha, self._charge_source, script_keys,
                                   script_args) if self._fast is not None
                else self._charge(keys=script_keys, args=script_args))
        if self._instrument is None:
            return text(await call)
        return text(await self._instrument.run("charge.lua", call))

    async def due_sessions(self, partition: int, now_ms: int, limit: int
                           ) -> list[tuple[str, str]]:
        """(account id, session id) of up to `limit` sessions past their deadline."""
        keys: Any = await self._redis.zrangebyscore(
            deadlines_key(partition), "-inf", now_ms, start=0, num=limit)
        due = []
        for key in keys:
            account_id, session_id = await self._redis.hmget(text(key), "account", "session")
            if account_id is not None and session_id is not None:
                due.append((text(account_id), text(session_id)))
            else:  # a session whose hash expired or never held those fields
                await self._redis.zrem(deadlines_key(partition), key)
        return due

    async def close_if_stale(self, account_id: str, session_id: str, now_ms: int) -> bool:
        """Closes a session whose deadline passed; False if another process did first
        or a request came in meanwhile (the script checks both atomically)."""
        answer = await self.charge("S", account_id, session_id, 0, now_ms, now_ms, "-", [0])
        return not answer.startswith("0;")

    async def admin(self, account_id: str, operation: str, *args: int | str
                    ) -> AdminResult:
        """Runs one admin.lua operation; the account as it left it, in the same step."""
        keys = self.keys(account_id)
        now_ms = int(time.time() * 1000)
        call = self._admin(
            keys=[keys.account, keys.buckets, keys.usage, keys.open_sessions, keys.top_ups,
                  keys.final_sessions, keys.events, event_counter_key(keys.partition),
                  keys.adjustments, keys.cdrs],
            args=[operation, account_id, now_ms, self._event_trim(now_ms), *args],
        )
        raw = await (call if self._instrument is None
                     else self._instrument.run("admin.lua", call))
        if not isinstance(raw, list):
            return AdminResult(text(raw), None)
        return AdminResult(text(raw[0]), AccountSnapshot(
            account=_pairs(raw[1]), buckets=_pairs(raw[2]), usage=_pairs(raw[3]),
            open_sessions=int(raw[4]),
        ))
