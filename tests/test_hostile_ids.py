"""Ids that look like key names, through the real server: an account or session id holding
`:acct`, `:s:`, braces, glob characters or backslashes names its own keys and no other
(reconcile stays clean and counts every account, the account metric too), and a session
id open on one account cannot be opened on another."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server
from creditline.books.cdr import open_sink
from creditline.books.reconcile import reconcile
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.store.store import (
    META_KEY,
    account_keys,
    accounts_key,
    cdrs_key,
    claim_key,
    deadlines_key,
    event_counter_key,
    events_key,
    partition_tag,
    renewals_key,
)
from creditline.store.supervision import Supervisor
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.crc import key_slot

from tests.books import Books
from tests.conftest import settings_with
from tests.messages import RG_SMS, RG_WEB, block, ccr
from tests.stream_client import StreamCharging

LIMITS = Settings()
# the longest of each the server takes, made of the characters that used to collide
LONGEST_SESSION_ID = ("{0}:s:x:acct*?\\" * 30)[:LIMITS.max_session_id_bytes]
HOSTILE_SESSION_IDS = ["x:acct", "}", "{", "{0}", "*", "?", "\\", "a:s:b", "b:acct",
                       ":sessions", "é{}", LONGEST_SESSION_ID]
# account ids the pattern allows (letters, digits, ._:@+-), as suffixes of a prefix
HOSTILE_ACCOUNT_SUFFIXES = ["a", "a:s", "a:acct", "a:s:b", "a:buckets", "a:s:x:acct"]
REFUSED_ACCOUNT_IDS = ["}", "{", "*", "?", "\\", "a{0}"]
BALANCE = 10_000_000
KIB = 1_000  # RG_WEB: micros per started KiB
_prefixes = itertools.count(1)


def hostile_account_ids(prefix: str) -> list[str]:
    longest = (prefix + "a:acct" * 30)[:LIMITS.max_account_id_bytes]
    return [prefix + suffix for suffix in HOSTILE_ACCOUNT_SUFFIXES] + [longest]


def unique_prefix() -> str:
    # a prefix of its own: the test Redis is shared by the session and never flushed
    return f"h{os.getpid()}x{next(_prefixes)}-"


# the account ids key_names names every key of an account for
KEY_NAMES_ACCOUNT_IDS = [*hostile_account_ids(""), "a:a", "1:a", "x"]


def key_names(partitions: int) -> dict[str, tuple[str, ...]]:
    """Every key the scheme names for hostile account and session ids, and what each names
    (what it is, its ids); fails at a key named twice, or a session's key off its account's
    slot. tests/test_identities.py adds the identities' keys."""
    names: dict[str, tuple[str, ...]] = {}

    def name(key: str, *what: str) -> None:
        assert names.setdefault(key, what) == what, (key, names[key], what)

    for account_id in KEY_NAMES_ACCOUNT_IDS:
        keys = account_keys(account_id, partitions)
        for kind in ("account", "buckets", "usage", "open_sessions", "final_sessions",
                     "top_ups", "rates", "adjustments", "purchases", "subscriptions",
                     "members"):
            name(getattr(keys, kind), kind, account_id)
        for session_id in [*HOSTILE_SESSION_IDS, "s", "acct", "x"]:
            name(keys.session(session_id), "session", account_id, session_id)
            name(keys.event(session_id), "event", account_id, session_id)
            name(claim_key(session_id, partitions), "claim", session_id)
            # braces in the session id do not move its keys off the account's slot
            assert key_slot(keys.session(session_id).encode()) == key_slot(
                keys.account.encode()) == key_slot(partition_tag(keys.partition).encode())
    for key, kind in ((events_key(0), "events"), (event_counter_key(0), "counter"),
                      (cdrs_key(0), "cdrs"), (deadlines_key(0), "deadlines"),
                      (renewals_key(0), "renewals"), (accounts_key(0), "index"),
                      (META_KEY, "meta")):
        name(key, kind)
    return names


def test_key_names_are_injective_and_keep_their_partition_slot() -> None:
    key_names(partitions=1)  # every id in one partition: where collisions would show


async def _open_update_close(charging: Any, account_id: str, session_id: str) -> None:
    """One session: 1 KiB granted, used in two reports, charged 1 KiB in all."""
    answer = await charging.Initial(ccr(session_id, account_id, 0,
                                        block(RG_WEB, requested=1_024)))
    assert answer.result_code == pb.SUCCESS, (account_id, session_id, answer)
    answer = await charging.Update(ccr(session_id, account_id, 1,
                                       block(RG_WEB, requested=1_024, used=1_000)))
    assert answer.result_code == pb.SUCCESS, (account_id, session_id, answer)
    answer = await charging.Terminate(ccr(session_id, account_id, 2, block(RG_WEB, used=24)))
    assert answer.result_code == pb.SUCCESS, (account_id, session_id, answer)
    assert answer.session_id == session_id


async def _create(admin: admin_pb2_grpc.AdminStub, books: Books, account_id: str) -> None:
    created = await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=BALANCE))
    assert created.account_id == account_id
    books.track(account_id)


async def test_hostile_ids_open_charge_and_close_their_own_sessions(  # type: ignore[no-untyped-def]
        charging, admin, books, checked_books) -> None:
    accounts = hostile_account_ids(unique_prefix())
    for account_id in accounts:
        await _create(admin, books, account_id)
    for account_id in accounts:  # one account at a time: a closed session id is free again
        for session_id in HOSTILE_SESSION_IDS:
            await _open_update_close(charging, account_id, session_id)
    for account_id in accounts:
        state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert state.balance_micros == BALANCE - KIB * len(HOSTILE_SESSION_IDS), account_id
        assert state.reserved_micros == 0 and state.open_sessions == 0


async def test_account_ids_the_pattern_refuses_are_named(charging, admin) -> None:  # type: ignore[no-untyped-def]
    for account_id in REFUSED_ACCOUNT_IDS:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id=account_id))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith("account_id:"), account_id
        answer = await charging.Initial(ccr(f"{account_id};s", account_id, 0,
                                            block(RG_WEB, requested=1_024)))
        assert answer.result_code == pb.INVALID_AVP_VALUE
        assert answer.error_message.startswith("account_id:"), answer


async def _account(admin: admin_pb2_grpc.AdminStub, account_id: str) -> admin_pb.Account:
    return await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))


async def test_a_session_id_open_on_one_account_is_refused_on_another(  # type: ignore[no-untyped-def]
        charging, admin, make_account, checked_books) -> None:
    first, second = await make_account(BALANCE), await make_account(BALANCE)
    sid = f"{first};shared"
    opened = await charging.Initial(ccr(sid, first, 0, block(RG_WEB, requested=10_240)))
    assert opened.result_code == pb.SUCCESS

    refused = await charging.Initial(ccr(sid, second, 0, block(RG_WEB, requested=10_240)))
    assert refused.result_code == pb.INVALID_AVP_VALUE
    assert refused.error_message == "session_id: already open on another account"
    assert not refused.rating_groups
    untouched = await _account(admin, second)
    assert untouched.balance_micros == BALANCE and untouched.reserved_micros == 0
    assert untouched.open_sessions == 0
    # the refused account has no such session: its Update is for an unknown one
    stray = await charging.Update(ccr(sid, second, 1, block(RG_WEB, used=1)))
    assert stray.result_code == pb.UNKNOWN_SESSION_ID

    # the first account's session goes on: its retransmission gets the stored answer
    assert await charging.Initial(ccr(sid, first, 0, block(RG_WEB, requested=10_240))) == opened
    answer = await charging.Update(ccr(sid, first, 1, block(RG_WEB, requested=10_240,
                                                            used=5_000)))
    assert answer.result_code == pb.SUCCESS
    answer = await charging.Terminate(ccr(sid, first, 2, block(RG_WEB, used=100)))
    assert answer.result_code == pb.SUCCESS
    assert (await _account(admin, first)).balance_micros == BALANCE - 5 * KIB

    # closed: the id may be opened by another account (README, rules)
    reopened = await charging.Initial(ccr(sid, second, 0, block(RG_WEB, requested=1_024)))
    assert reopened.result_code == pb.SUCCESS
    closed = await charging.Terminate(ccr(sid, second, 1, block(RG_WEB, used=1_024)))
    assert closed.result_code == pb.SUCCESS
    assert (await _account(admin, second)).balance_micros == BALANCE - KIB


async def test_a_refused_initial_leaves_its_session_id_free(  # type: ignore[no-untyped-def]
        charging, admin, make_account, checked_books) -> None:
    acct, barred = await make_account(BALANCE), await make_account(BALANCE)
    await admin.SetAccountState(admin_pb.SetAccountStateRequest(account_id=barred,
                                                                state=admin_pb.BARRED))
    for other, code in ((f"{acct}-nobody", pb.USER_UNKNOWN), (barred, pb.END_USER_SERVICE_DENIED)):
        sid = f"{acct};after-{code}"
        answer = await charging.Initial(ccr(sid, other, 0, block(RG_WEB, requested=1_024)))
        assert answer.result_code == code
        await _open_update_close(charging, acct, sid)
    assert (await _account(admin, barred)).balance_micros == BALANCE


async def test_two_accounts_opening_one_session_id_at_once_get_one_session(  # type: ignore[no-untyped-def]
        charging, admin, make_account, checked_books) -> None:
    accounts = [await make_account(BALANCE), await make_account(BALANCE)]
    sids = [f"{accounts[0]};race-{n}" for n in range(20)]
    answers = await asyncio.gather(*(
        charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=1_024)))
        for sid in sids for acct in accounts))
    for n, sid in enumerate(sids):
        pair = answers[2 * n:2 * n + 2]
        codes = sorted(answer.result_code for answer in pair)
        assert codes == [pb.SUCCESS, pb.INVALID_AVP_VALUE], (sid, pair)
        [loser] = [answer for answer in pair if answer.result_code != pb.SUCCESS]
        assert loser.error_message.startswith("session_id: "), loser
        winner = accounts[[answer.result_code for answer in pair].index(pb.SUCCESS)]
        closed = await charging.Terminate(ccr(sid, winner, 1, block(RG_WEB, used=1_024)))
        assert closed.result_code == pb.SUCCESS
    charged = [BALANCE - (await _account(admin, acct)).balance_micros for acct in accounts]
    assert sum(charged) == KIB * len(sids)  # each session id charged once, on one account




def _claim_value(account_id: str, taken_ms: int, session_id: str, partitions: int) -> str:
    session_key = account_keys(account_id, partitions).session(session_id)
    return f"{account_id}|{taken_ms}|{session_key}"


async def test_a_claim_without_a_session_is_taken_over_when_left_behind(  # type: ignore[no-untyped-def]
        server: RunningServer, charging, make_account, redis, settings, checked_books) -> None:
    acct = await make_account(BALANCE)
    sid = f"{acct};left-by-a-crash"
    key = claim_key(sid, settings.partitions)
    now_ms = int(time.time() * 1000)
    await redis.set(key, _claim_value(f"{acct}-other", now_ms, sid, settings.partitions))
    if not server.store.claims_in_script:
        # on a cluster the claim is taken before the other account's script runs: that
        # Initial may be on its way still
        answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=1_024)))
        assert answer.result_code == pb.INVALID_AVP_VALUE
        assert answer.error_message == "session_id: being opened on another account"
        # past the grace with no session behind it: a crash left it
        await redis.set(key, _claim_value(f"{acct}-other",
                                          now_ms - server.store.config.claim_grace_ms, sid,
                                          settings.partitions))
    # (on one Redis server the claim and the session are written by one script: a claim
    # without its session was left by something else, and is taken over at once)
    await _open_update_close(charging, acct, sid)
    assert await redis.exists(key) == 0  # given back at the Terminate


async def test_supervision_closing_a_session_frees_its_id(  # type: ignore[no-untyped-def]
        server: RunningServer, charging, make_account, redis, settings, checked_books) -> None:
    stale, other = await make_account(BALANCE), await make_account(BALANCE)
    sid = f"{stale};supervised"
    answer = await charging.Initial(ccr(sid, stale, 0, block(RG_WEB, requested=1_024)))
    assert answer.result_code == pb.SUCCESS
    keys = account_keys(stale, settings.partitions)
    await redis.zadd(deadlines_key(keys.partition),
                     {keys.session(sid): int(time.time() * 1000) - 1})
    closed = await Supervisor(server.store, interval_s=60, batch=10).sweep_once()
    assert closed >= 1 and await redis.hget(keys.session(sid), "state") == "closed"
    assert await redis.exists(claim_key(sid, settings.partitions)) == 0
    await _open_update_close(charging, other, sid)


# ---------------------------------------------------------------- a deployment of its own
# reconcile and the account count look at every account of a Redis: these run on their own


@dataclass
class Deployment:
    running: RunningServer
    url: str
    channel: grpc.aio.Channel
    redis: Redis


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


@pytest.fixture(scope="module")
async def deployment(own_redis: RedisProcess, settings: Settings
                     ) -> AsyncIterator[Deployment]:
    running = await start_server(settings_with(
        settings, metrics_listen_address="127.0.0.1:0", metrics_accounts_interval_s=0.05),
        own_redis.url, environ={})
    redis = Redis.from_url(own_redis.url, decode_responses=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Deployment(running, own_redis.url, channel, redis)
    await redis.aclose()
    await stop_server(running, grace_s=1.0)


async def _charge_everything(charging: Any, admin: admin_pb2_grpc.AdminStub, books: Books,
                             accounts: list[str]) -> None:
    """Closed sessions on every account but the last, open ones on it, and an event with
    every hostile session id on the first (event answers are keys too)."""
    for account_id in accounts:
        await _create(admin, books, account_id)
    for account_id in accounts[:-1]:
        for session_id in HOSTILE_SESSION_IDS:
            await _open_update_close(charging, account_id, session_id)
    for session_id in HOSTILE_SESSION_IDS:
        answer = await charging.Initial(ccr(session_id, accounts[-1], 0,
                                            block(RG_WEB, requested=1_024)))
        assert answer.result_code == pb.SUCCESS, (session_id, answer)
        answer = await charging.Event(pb.EventRequest(
            session_id=session_id, account_id=accounts[0], action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_SMS, requested=1)]))
        assert answer.result_code == pb.SUCCESS, (session_id, answer)


def _reconciled(url: str, sink_url: str, partitions: int) -> tuple[int, list[Any]]:
    sink, redis = open_sink(sink_url), SyncRedis.from_url(url)
    try:
        checked, problems = reconcile(redis, partitions, sink)
        return checked, list(problems)
    finally:
        sink.close()
        redis.close()


def _reconcile_command(url: str, sink_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "creditline", "reconcile", "--redis-url", url,
         "--sink", sink_url], capture_output=True, text=True, timeout=120, check=False)


async def _counted_accounts(running: RunningServer, expected: int) -> int | None:
    metrics = running.telemetry.metrics
    assert metrics is not None
    deadline = time.monotonic() + 10
    while metrics.accounts != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the gauge counts every metrics_accounts_interval_s
    return metrics.accounts


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_reconcile_and_the_account_count_see_every_hostile_account(
        deployment: Deployment, settings: Settings, tmp_path: Path, transport: str) -> None:
    await deployment.running.redis.flushall()  # reconcile counts every account there is
    await deployment.running.store.check_partitions()
    stub = charging_pb2_grpc.ChargingStub(deployment.channel)
    charging: Any = stub if transport == "unary" else StreamCharging(stub)
    books = Books(deployment.redis, settings.partitions)
    accounts = hostile_account_ids("")
    await _charge_everything(charging, admin_pb2_grpc.AdminStub(deployment.channel), books,
                             accounts)
    if transport == "stream":
        await charging.close()
    await books.assert_balanced()

    sink_url = f"sqlite:///{tmp_path / 'cdrs.db'}"
    # (in threads: the server runs on this event loop)
    assert await asyncio.to_thread(_reconciled, deployment.url, sink_url, settings.partitions
                                   ) == (len(accounts), [])
    result = await asyncio.to_thread(_reconcile_command, deployment.url, sink_url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reconciled {len(accounts)} accounts: 0 discrepancies" in result.stderr
    assert await _counted_accounts(deployment.running, len(accounts)) == len(accounts)


async def test_a_redis_written_with_the_old_key_scheme_is_refused(
        settings: Settings, tmp_path: Path) -> None:
    with RedisProcess() as old:
        redis = SyncRedis.from_url(old.url)
        # what an older version left: its partition count, and no key scheme
        redis.hset(META_KEY, "partitions", settings.partitions)
        redis.close()
        with pytest.raises(ValueError, match="key scheme 1") as refused:
            await start_server(settings, old.url)
        assert "empty Redis" in str(refused.value)
        result = await asyncio.to_thread(_reconcile_command, old.url,
                                         f"sqlite:///{tmp_path / 'cdrs.db'}")
        assert result.returncode == 2 and "key scheme 1" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


# the scenarios test_cluster.py runs on a Redis Cluster too
CLUSTER_SCENARIOS = [
    test_hostile_ids_open_charge_and_close_their_own_sessions,
    test_account_ids_the_pattern_refuses_are_named,
    test_a_session_id_open_on_one_account_is_refused_on_another,
    test_a_refused_initial_leaves_its_session_id_free,
    test_two_accounts_opening_one_session_id_at_once_get_one_session,
    test_a_claim_without_a_session_is_taken_over_when_left_behind,
]
