"""Redis access: key names, the Lua scripts, and the calls that run them.

Every key of an account carries the account id as its hash tag (`cl:{<account>}:...`), so
each script touches one hash slot and runs unchanged on Redis Cluster. Scripts are loaded
once and called with EVALSHA; redis-py's Script reloads them on NOSCRIPT (e.g. after a
Redis restart) and retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

if TYPE_CHECKING:
    from creditline.telemetry import ScriptInstrument

KEY_PREFIX = "cl"
# How many unit buckets one account may hold: the charging script reads them all.
MAX_BUCKETS_PER_ACCOUNT = 32


@dataclass(frozen=True, slots=True)
class AccountKeys:
    account: str
    buckets: str
    usage: str
    open_sessions: str
    top_ups: str
    tag: str

    def session(self, session_id: str) -> str:
        return f"{self.tag}:sess:{session_id}"

    def event(self, session_id: str) -> str:
        return f"{self.tag}:evt:{session_id}"


def account_keys(account_id: str) -> AccountKeys:
    tag = f"{KEY_PREFIX}:{{{account_id}}}"
    return AccountKeys(
        account=f"{tag}:acct", buckets=f"{tag}:buckets", usage=f"{tag}:usage",
        open_sessions=f"{tag}:sessions", top_ups=f"{tag}:topups", tag=tag,
    )


def _script_source(name: str) -> str:
    return resources.files("creditline").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    account: dict[str, str]
    buckets: dict[str, str]
    usage: dict[str, str]
    open_sessions: int


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    """The charging and admin scripts bound to one Redis client."""

    def __init__(self, redis: Redis, answer_retention_s: int,
                 instrument: ScriptInstrument | None = None) -> None:
        self._redis = redis
        self._answer_retention_s = answer_retention_s
        # a span and a latency sample per script call; None (telemetry off): nothing
        self._instrument = instrument
        self._charge: AsyncScript = redis.register_script(_script_source("charge.lua"))
        self._admin: AsyncScript = redis.register_script(_script_source("admin.lua"))

    async def charge(
        self, kind: str, account_id: str, session_id: str, request_number: int,
        now_s: int, event_action: str, blocks: list[int | str],
    ) -> str:
        """Runs one charging request (kind I/U/T/E); returns the script's answer string."""
        keys = account_keys(account_id)
        request_key = keys.event(session_id) if kind == "E" else keys.session(session_id)
        call = self._charge(
            keys=[keys.account, request_key, keys.buckets, keys.usage, keys.open_sessions],
            args=[kind, request_number, now_s, self._answer_retention_s, event_action,
                  *blocks],
        )
        if self._instrument is None:
            return _text(await call)
        return _text(await self._instrument.run("charge.lua", call))

    async def admin(self, account_id: str, operation: str, *args: int | str) -> Any:
        keys = account_keys(account_id)
        call = self._admin(
            keys=[keys.account, keys.buckets, keys.usage, keys.open_sessions, keys.top_ups],
            args=[operation, *args],
        )
        if self._instrument is None:
            return await call
        return await self._instrument.run("admin.lua", call)

    async def snapshot(self, account_id: str) -> AccountSnapshot | None:
        raw = await self.admin(account_id, "GET")
        if not isinstance(raw, list):
            return None
        return AccountSnapshot(
            account=_pairs(raw[0]), buckets=_pairs(raw[1]), usage=_pairs(raw[2]),
            open_sessions=int(raw[3]),
        )
