"""The books, read straight from Redis: for every account, initial + top-ups - charges
+ refunds + adjustments - purchases - fees = balance, reserved = the sum of the
money held by its open sessions, and each bucket's reserved units = the sum its open
sessions hold of it. A shared group's account counts its members' charges, sessions and
holds with its own; each member's reserved is its own sessions', its charges its usage's,
and within its limit what it spent."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from creditline.store.contract import SessionRatingGroup, group_of, session_rating_groups
from creditline.store.store import AccountKeys, account_keys, parse_bucket
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster


def _legacy(session: dict[bytes, bytes]) -> list[SessionRatingGroup]:
    """The rating groups of a session an older version wrote field by field (k:, m:, b:,
    bl:, ...): what they hold."""
    def field(prefix: str, rg: str) -> str:
        return session.get(f"{prefix}:{rg}".encode(), b"").decode()

    groups = [name.decode()[2:] for name in session if name.startswith(b"k:")]
    return [SessionRatingGroup(
        used=int(field("u", rg) or 0), charged=int(field("c", rg) or 0),
        from_buckets=int(field("fb", rg) or 0), uncharged=int(field("x", rg) or 0),
        reserved=int(field("m", rg) or 0), bucket_units=int(field("b", rg) or 0),
        bucket_rating_group=field("k", rg), tariff=field("tf", rg),
        bucket_holds=field("bl", rg)) for rg in groups]


@dataclass
class AccountBooks:
    balance: int
    reserved: int
    charged: int
    refunded: int
    topped_up: int
    adjusted: int
    purchased: int
    fees: int
    initial: int
    credit_limit: int
    sessions_reserved: int
    bucket_reserved: dict[str, int]
    sessions_bucket_reserved: dict[str, int]
    usage_charged: int


class Books:
    def __init__(self, redis: Redis, partitions: int) -> None:
        self.redis = redis
        self.partitions = partitions
        self.accounts: list[str] = []

    def track(self, account_id: str) -> None:
        self.accounts.append(account_id)

    async def _session(self, key: str) -> dict[bytes, bytes]:
        """A session hash as bytes: its rating-group states are binary."""
        if isinstance(self.redis, RedisCluster):
            node = self.redis.get_default_node()
            cluster = RedisCluster(host=node.host, port=node.port)
            try:
                clustered: dict[bytes, bytes] = await cluster.hgetall(key)
            finally:
                await cluster.aclose()
            return clustered
        kwargs = {**self.redis.connection_pool.connection_kwargs, "decode_responses": False}
        pool = ConnectionPool(**kwargs)
        try:
            session: dict[bytes, bytes] = await Redis(connection_pool=pool).hgetall(key)
        finally:
            await pool.disconnect()
        return session

    async def read(self, account_id: str) -> AccountBooks:
        """An account's books; a group's with its members' sessions and usage."""
        keys = account_keys(account_id, self.partitions)
        account = await self.redis.hgetall(keys.account)
        sessions_reserved, sessions_bucket, usage_charged = await self._held(keys)
        if group_of(account_id) is None:
            for member in await self.redis.smembers(keys.members):
                reserved, bucket, usage = await self._held(account_keys(member, self.partitions))
                sessions_reserved += reserved
                usage_charged += usage
                for serial, units in bucket.items():
                    sessions_bucket[serial] += units
        buckets = [parse_bucket(v) for v in (await self.redis.hgetall(keys.buckets)).values()]
        live_serials = {str(b.serial) for b in buckets}
        return AccountBooks(
            balance=int(account.get("balance", 0)), reserved=int(account["reserved"]),
            charged=int(account["charged"]), refunded=int(account["refunded"]),
            topped_up=int(account.get("topped_up", 0)), adjusted=int(account.get("adjusted", 0)),
            purchased=int(account.get("purchased", 0)), fees=int(account.get("fees", 0)),
            initial=int(account.get("initial", 0)),
            credit_limit=int(account.get("credit_limit", 0)),
            sessions_reserved=sessions_reserved,
            bucket_reserved={str(b.serial): b.reserved for b in buckets if b.reserved},
            # a bucket removed since (expired) took its reservations with it
            sessions_bucket_reserved={k: v for k, v in sessions_bucket.items()
                                      if v and k in live_serials},
            usage_charged=usage_charged,
        )

    async def _held(self, keys: AccountKeys) -> tuple[int, dict[str, int], int]:
        """(money its open sessions hold, bucket serial -> units they hold, net charges
        its usage records) of one account."""
        sessions_reserved = 0
        sessions_bucket: dict[str, int] = defaultdict(int)  # bucket serial -> units
        for session_key in await self.redis.smembers(keys.open_sessions):
            session = await self._session(session_key)
            assert session.get(b"state") == b"open", f"{session_key} in the open set but closed"
            for state in [*session_rating_groups(session).values(), *_legacy(session)]:
                sessions_reserved += state.reserved
                if state.bucket_holds:
                    held = dict(part.split("=") for part in state.bucket_holds.split(","))
                    assert sum(map(int, held.values())) == state.bucket_units
                    for serial, units in held.items():
                        sessions_bucket[serial] += int(units)
        usage = await self.redis.hgetall(keys.usage)
        usage_charged = sum(int(v) for f, v in usage.items() if f.endswith(":charged"))
        return sessions_reserved, sessions_bucket, usage_charged

    async def assert_member_balanced(self, member_id: str) -> None:
        """A member's own books (its group's hold its money): what it holds is what its
        sessions hold, its charges are its usage's, and it spent within its limit."""
        b = await self.read(member_id)
        assert b.reserved == b.sessions_reserved, (member_id, b)
        assert b.usage_charged == b.charged - b.refunded, (member_id, b)
        fields = await self.redis.hgetall(account_keys(member_id, self.partitions).account)
        if "limit" in fields:
            assert int(fields["spent"]) + b.reserved <= int(fields["limit"]), (member_id, fields)

    async def assert_balanced(self, account_id: str | None = None) -> None:
        for account in [account_id] if account_id else self.accounts:
            if group_of(account) is not None:
                await self.assert_member_balanced(account)
                continue
            b = await self.read(account)
            assert (b.initial + b.topped_up - b.charged + b.refunded + b.adjusted
                    - b.purchased - b.fees == b.balance), (account, b)
            assert b.reserved == b.sessions_reserved, (account, b)
            assert b.bucket_reserved == b.sessions_bucket_reserved, (account, b)
            # usage records net charges (refunds recorded negative) per rating group
            assert b.usage_charged == b.charged - b.refunded, (account, b)
            assert b.balance - b.reserved >= -b.credit_limit, (account, b)
            assert b.reserved >= 0, (account, b)
