"""CDRs: written with the final charge, exported once into SQLite, PostgreSQL or JSON lines,
and reconciled against the balances. These tests run their own Redis and server, so the
CDR streams and the accounts are theirs alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import psycopg
import pytest
from creditline.api.app import RunningServer, redis_client, start_server, stop_server
from creditline.api.messages import block_plan
from creditline.books.cdr import Sink, open_sink
from creditline.books.exporter import Exporter
from creditline.books.reconcile import reconcile
from creditline.charging.kernels import select_kernels
from creditline.charging.rating import BandedRater, load_plan
from creditline.settings import Settings
from creditline.store.contract import EventAction, RequestKind
from creditline.store.redis_process import RedisProcess
from creditline.store.store import Store, account_keys
from creditline.store.transport import RedisPy
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis import Redis

from tests.messages import RG_SMS, RG_VOICE, RG_WEB, block, ccr

POSTGRES_URL = os.environ.get("CREDITLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/test")


@dataclass
class Books:
    server: RunningServer
    redis_url: str
    charging: charging_pb2_grpc.ChargingStub
    admin: admin_pb2_grpc.AdminStub
    partitions: int

    def sync_redis(self) -> Redis:
        return Redis.from_url(self.redis_url)


@pytest.fixture(scope="module")
def books_redis() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


@pytest.fixture(scope="module")
async def books(books_redis: RedisProcess, settings: Settings) -> AsyncIterator[Books]:
    running = await start_server(settings, books_redis.url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Books(running, books_redis.url, charging_pb2_grpc.ChargingStub(channel),
                    admin_pb2_grpc.AdminStub(channel), settings.partitions)
    await stop_server(running, grace_s=1.0)


@pytest.fixture(autouse=True)
async def fresh_books(books: Books) -> AsyncIterator[None]:
    """Each test starts from an empty Redis: its sinks must hold every CDR to reconcile."""
    yield
    await books.server.redis.flushall()
    await books.server.store.check_partitions()


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    schema = f"creditline_test_{os.getpid()}"
    yield schema
    with psycopg.connect(POSTGRES_URL, autocommit=True) as db:
        db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def some_traffic(books: Books, prefix: str, accounts: int = 5) -> list[str]:
    """Sessions (terminated and open), debits, refunds and adjustments on new accounts."""
    ids = []
    for n in range(accounts):
        acct = f"{prefix}-{n}"
        ids.append(acct)
        await books.admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=acct, initial_balance_micros=10_000_000))
        await books.admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=500_000,
                                                      top_up_id="t"))
        for s in range(3):
            sid = f"{acct};{s}"
            await books.charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                                             block(RG_VOICE, requested=120)))
            await books.charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=10_240,
                                                                used=5_000 + s),
                                            block(RG_VOICE, used=61)))
            if s < 2:  # the third session stays open
                await books.charging.Terminate(ccr(sid, acct, 2, block(RG_WEB, used=100)))
        for index, action in enumerate((pb.DIRECT_DEBIT, pb.DIRECT_DEBIT, pb.REFUND)):
            await books.charging.Event(pb.EventRequest(
                session_id=f"{acct};e{index}{n}", account_id=acct, action=action,
                rating_groups=[block(RG_SMS, requested=2)],
                refund_of_session_id=f"{acct};e1{n}" if action == pb.REFUND else ""))
        # the last 10 s of the first (terminated) session's voice back, and care's credit
        # and debit: CDRs of their own that the books must count
        refunded = await books.charging.Event(pb.EventRequest(
            session_id=f"{acct};r{n}", account_id=acct, action=pb.REFUND,
            rating_groups=[block(RG_VOICE, requested=10)], refund_of_session_id=f"{acct};0"))
        # 61 s used: its last 10 s are 1 s at 0.01 and 9 s of the whole first minute
        assert refunded.rating_groups[0].amount_micros == 10_000, refunded
        for amount in (300_000, -120_000):
            await books.admin.AdjustBalance(admin_pb.AdjustBalanceRequest(
                account_id=acct, amount_micros=amount, adjustment_id=f"a{amount}",
                reason="care"))
    return ids


def export_all(books: Books, sink: Sink) -> int:
    redis = books.sync_redis()
    try:
        return Exporter(redis, books.partitions, sink).drain()
    finally:
        redis.close()


def assert_reconciled(books: Books, sink: Sink) -> int:
    redis = books.sync_redis()
    try:
        checked, problems = reconcile(redis, books.partitions, sink)
    finally:
        redis.close()
    assert problems == []
    return checked


async def test_cdr_contents_for_a_session_and_events(books: Books, tmp_path: Path) -> None:
    acct = "cdr-contents"
    await books.admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=acct, initial_balance_micros=5_000_000))
    await books.charging.Initial(ccr("call", acct, 0, block(RG_VOICE, requested=300),
                                     block(RG_WEB, requested=2_048)))
    await books.charging.Terminate(ccr("call", acct, 1, block(RG_VOICE, used=61),
                                       block(RG_WEB, used=1_500)))
    await books.charging.Event(pb.EventRequest(session_id="sms", account_id=acct,
                                               action=pb.DIRECT_DEBIT,
                                               rating_groups=[block(RG_SMS, requested=3)]))
    await books.charging.Event(pb.EventRequest(
        session_id="sms-refund", account_id=acct, action=pb.REFUND,
        rating_groups=[block(RG_SMS, requested=1)], refund_of_session_id="sms"))
    await books.admin.AdjustBalance(admin_pb.AdjustBalanceRequest(
        account_id=acct, amount_micros=70_000, adjustment_id="care-1", reason="goodwill"))
    sink = open_sink(f"sqlite:///{tmp_path / 'cdrs.db'}")
    export_all(books, sink)
    db = sink._db  # type: ignore[attr-defined]
    rows = db.execute("SELECT kind, session_id, cause, result_code, charged_micros, "
                      "balance_after_micros, items, reference FROM cdr WHERE account_id = ? "
                      "ORDER BY ended_ms, kind", (acct,)).fetchall()
    import json
    # by kind, not by position: the Terminate and the Event may end in the same millisecond
    kinds = ["session", "event", "refund", "adjustment"]
    assert sorted(row[0] for row in rows) == sorted(kinds)
    session, event, refund, adjustment = sorted(rows, key=lambda row: kinds.index(row[0]))
    assert refund[:6] == ("refund", "sms-refund", "event", 2001, -50_000, 4_188_000)
    assert refund[7] == "sms"  # what it reverses
    assert adjustment[:6] == ("adjustment", "care-1", "adjustment", 2001, -70_000, 4_258_000)
    assert adjustment[7] == "goodwill"
    assert session[:6] == ("session", "call", "terminate", 2001, 710_000 + 2_000, 4_288_000)
    items = {i["rating_group"]: i for i in json.loads(session[6])}
    assert items[str(RG_VOICE)]["used_units"] == 61
    assert items[str(RG_VOICE)]["charged_micros"] == 710_000  # connect + first minute + 1 s
    assert items[str(RG_VOICE)]["tariff"] == f"default/{RG_VOICE}"
    assert items[str(RG_WEB)]["charged_micros"] == 2_000
    assert event[:6] == ("event", "sms", "event", 2001, 150_000, 4_138_000)
    sink.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "jsonl"])
async def test_export_then_reconcile(books: Books, tmp_path: Path, postgres_schema: str,
                                     kind: str) -> None:
    await some_traffic(books, f"reconcile-{kind}")
    url = {"sqlite": f"sqlite:///{tmp_path / 'cdrs.db'}",
           "postgres": f"{POSTGRES_URL}?schema={postgres_schema}",
           "jsonl": f"jsonl:///{tmp_path / 'cdrs'}?max_bytes=4096"}[kind]
    sink = open_sink(url)
    assert_reconciled(books, sink)  # before the export: the CDRs are in the streams
    exported = export_all(books, sink)
    assert exported > 0 and sink.count() == exported
    assert export_all(books, sink) == 0
    assert_reconciled(books, sink)
    if kind == "jsonl":
        assert len(list((tmp_path / "cdrs").glob("cdrs-*.jsonl"))) > 1  # rotated by size
    sink.close()


async def test_exporter_crash_between_commit_and_ack_loses_and_duplicates_nothing(
        books: Books, tmp_path: Path, postgres_schema: str) -> None:
    await some_traffic(books, "crash", accounts=10)
    for url in (f"sqlite:///{tmp_path / 'cdrs.db'}", f"jsonl:///{tmp_path / 'jsonl'}",
                f"{POSTGRES_URL}?schema={postgres_schema}"):
        redis = books.sync_redis()
        backlog = Exporter(redis, books.partitions, open_sink(url)).backlog()
        # take a copy of the streams, so every sink sees the same CDRs
        copies = {k: redis.xrange(k) for k in redis.scan_iter("cl:*:cdrs")}

        sink = open_sink(url)
        crashing = Exporter(redis, books.partitions, sink, batch_size=7)

        def crash() -> None:
            raise KeyboardInterrupt("killed between the commit and the acknowledgement")

        for partition in range(books.partitions):
            if redis.xlen(f"cl:{{{partition}}}:cdrs"):
                with pytest.raises(KeyboardInterrupt):
                    crashing.export_partition(partition, after_commit=crash)
                break
        sink.close()
        restarted_sink = open_sink(url)
        Exporter(redis, books.partitions, restarted_sink, batch_size=7).drain()
        assert restarted_sink.count() == backlog
        assert_reconciled(books, restarted_sink)
        restarted_sink.close()
        for key, entries in copies.items():  # put the CDRs back for the next sink
            redis.delete(key)
            for stream_id, fields in entries:
                redis.xadd(key, fields, id=stream_id)
        redis.close()


async def test_reconcile_names_the_account_and_amount_and_fails(
        books: Books, tmp_path: Path) -> None:
    accounts = await some_traffic(books, "tamper", accounts=2)
    redis = books.sync_redis()
    redis.hincrby(account_keys(accounts[1], books.partitions).account, "balance", 1_234)
    redis.close()
    sink_url = f"sqlite:///{tmp_path / 'cdrs.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "creditline", "reconcile", "--redis-url", books.redis_url,
         "--sink", sink_url], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{accounts[1]}: balance" in result.stdout
    assert "difference 1234" in result.stdout
    assert accounts[0] not in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_hundred_thousand_cdrs_exported_and_reconciled(books: Books,
                                                             tmp_path: Path) -> None:
    # a client of its own with a long deadline: this test is about volume, not latency
    redis = redis_client(books.redis_url, replace(Settings(), redis_call_timeout_s=60))
    store = Store(RedisPy(redis), books.server.store.config)
    accounts = [f"bulk-{n}" for n in range(200)]
    for acct in accounts:
        await books.admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=acct, initial_balance_micros=10**12))
    now_ms = 1_800_000_000_000
    # the charging script's arguments for one SMS, as the server builds them
    plan = load_plan(Path(__file__).parent / "plan.toml")
    blocks = block_plan(select_kernels(), plan, BandedRater()).script_blocks(
        [block(RG_SMS, requested=1)], now_ms, default_grant=False)
    total = 100_000
    batch = 100  # concurrent calls: within the pool of Redis connections
    for start in range(0, total, batch):  # the real charging script, without gRPC
        await asyncio.gather(*(
            store.charge(RequestKind.EVENT, accounts[n % len(accounts)], f"ev{n}", 0, now_ms,
                         now_ms, EventAction.DEBIT, blocks) for n in range(start, start + batch)))
    sink = open_sink(f"sqlite:///{tmp_path / 'cdrs.db'}")
    assert export_all(books, sink) == total
    assert sink.count() == total
    assert assert_reconciled(books, sink) == len(accounts)
    sink.close()
    await redis.aclose()
