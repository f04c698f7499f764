"""Faults: Redis down and back, Redis killed (-9) with fsync on every write, a server
process killed (-9) under load while its client retries on another. Nothing is lost,
nothing is charged twice, the books balance. Marked `fault`; CI runs them. The last test
prints what the run did."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server
from creditline.books.cdr import open_sink
from creditline.books.exporter import Exporter
from creditline.books.reconcile import reconcile
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.books import Books
from tests.messages import RG_WEB, block, ccr

pytestmark = pytest.mark.fault
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


@dataclass
class FaultReport:
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    retransmissions: int = 0
    reconciled_accounts: int = 0
    discrepancies: int = 0


REPORT = FaultReport()


@pytest.fixture(scope="module")
def redis_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("redis-faults")


@pytest.fixture(scope="module")
def durable_redis(redis_dir: Path) -> Iterator[RedisProcess]:
    process = RedisProcess(data_dir=str(redis_dir), extra_args=DURABLE).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
async def fault_server(durable_redis: RedisProcess, settings: Settings
                       ) -> AsyncIterator[RunningServer]:
    quick = replace(settings, redis_call_timeout_s=0.5)
    running = await start_server(quick, durable_redis.url)
    yield running
    await stop_server(running, grace_s=1.0)


@pytest.fixture(scope="module")
async def stubs(fault_server: RunningServer) -> AsyncIterator[tuple[object, object]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fault_server.port}") as channel:
        yield charging_pb2_grpc.ChargingStub(channel), admin_pb2_grpc.AdminStub(channel)


async def _until_answered(calls):  # type: ignore[no-untyped-def]
    """The first answer of a few tries: each pooled Redis connection that died with Redis
    fails its next call once, then reconnects."""
    for call in calls:
        try:
            return await call
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    raise AssertionError("no answer after Redis came back")


def restart(process: RedisProcess) -> RedisProcess:
    """The same redis-server again: same port, same data directory."""
    return RedisProcess(data_dir=process.data_dir, port=process.port,
                        extra_args=process.extra_args).start()


async def test_redis_down_fails_fast_then_the_server_reconnects(
        durable_redis: RedisProcess, stubs, redis_dir: Path) -> None:  # type: ignore[no-untyped-def]
    charging, admin = stubs
    await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id="down",
                                                            initial_balance_micros=100_000))
    durable_redis.kill()
    REPORT.faults["redis unreachable"] += 1
    started = time.monotonic()
    answer = await charging.Initial(ccr("down;1", "down", 0, block(RG_WEB, requested=1_024)),
                                    timeout=10)
    REPORT.requests += 1
    assert answer.result_code == pb.UNABLE_TO_COMPLY
    assert answer.failure_handling == pb.FAILURE_HANDLING_RETRY_AND_TERMINATE
    assert time.monotonic() - started < 5  # the Redis deadline, not the client's
    back = restart(durable_redis)
    try:
        deadline = time.monotonic() + 20
        while True:  # the client retransmits; the server reconnects by itself
            REPORT.retransmissions += 1
            REPORT.requests += 1
            answer = await charging.Initial(ccr("down;1", "down", 0,
                                                block(RG_WEB, requested=1_024)), timeout=10)
            if answer.result_code != pb.UNABLE_TO_COMPLY or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert answer.result_code == pb.SUCCESS
        state = await _until_answered(admin.GetAccount(
            admin_pb.GetAccountRequest(account_id="down")) for _ in range(50))
        assert state.reserved_micros == 1_000  # reserved once, whatever the retries
    finally:
        durable_redis.__dict__.update(back.__dict__)


async def test_no_acknowledged_charge_is_lost_when_redis_is_killed(
        durable_redis: RedisProcess, stubs) -> None:  # type: ignore[no-untyped-def]
    charging, admin = stubs
    await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id="kill9",
                                                            initial_balance_micros=10**9))
    acknowledged = 0
    for n in range(200):
        answer = await charging.Event(pb.EventRequest(
            session_id=f"k{n}", account_id="kill9", action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_WEB, requested=1_024)]))
        REPORT.requests += 1
        if answer.result_code == pb.SUCCESS:
            acknowledged += 1
    durable_redis.kill()  # kill -9: no shutdown, no final save
    REPORT.faults["redis kill -9"] += 1
    back = restart(durable_redis)
    durable_redis.__dict__.update(back.__dict__)
    for _ in range(50):
        try:
            state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id="kill9"))
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    assert acknowledged == 200
    assert state.charged_micros == acknowledged * 1_000
    assert state.balance_micros == 10**9 - acknowledged * 1_000


def _server_process(redis_url: str, port: int, plan: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITLINE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "creditline", "serve", "--workers", "1", "--redis-url",
         redis_url, "--listen-address", f"127.0.0.1:{port}", "--plan-path", plan],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _ready(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)


async def test_server_killed_under_load_client_retries_on_another(
        durable_redis: RedisProcess, settings: Settings, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    servers = [_server_process(durable_redis.url, p, settings.plan_path) for p in ports]
    try:
        await asyncio.gather(*(_ready(p) for p in ports))
        first = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
        second = grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}")
        admin = admin_pb2_grpc.AdminStub(second)
        accounts = [f"k9-{n}" for n in range(10)]
        for acct in accounts:
            await admin.CreateAccount(admin_pb.CreateAccountRequest(
                account_id=acct, initial_balance_micros=10**9))
        stubs = [charging_pb2_grpc.ChargingStub(first), charging_pb2_grpc.ChargingStub(second)]

        async def session(acct: str, n: int) -> None:
            requests = [("Initial", ccr(f"{acct};{n}", acct, 0, block(RG_WEB, requested=4_096)))]
            requests += [("Update", ccr(f"{acct};{n}", acct, k, block(
                RG_WEB, requested=4_096, used=3_000))) for k in (1, 2)]
            requests += [("Terminate", ccr(f"{acct};{n}", acct, 3, block(RG_WEB, used=1_000)))]
            for method, request in requests:
                answer = None
                for attempt, stub in enumerate((stubs[0], stubs[1], stubs[1], stubs[1])):
                    REPORT.requests += 1
                    REPORT.retransmissions += attempt > 0
                    try:
                        answer = await getattr(stub, method)(request, timeout=5)
                    except grpc.aio.AioRpcError:
                        continue  # no answer: retransmit to the other process
                    if answer.result_code != pb.UNABLE_TO_COMPLY:
                        break
                assert answer is not None and answer.result_code == pb.SUCCESS, answer

        async def kill_first() -> None:
            await asyncio.sleep(0.5)
            servers[0].send_signal(signal.SIGKILL)
            REPORT.faults["server kill -9"] += 1

        await asyncio.gather(kill_first(), *(session(a, n) for a in accounts for n in range(10)))
        await first.close()
        await second.close()
        books = Books(Redis.from_url(durable_redis.url, decode_responses=True),
                      settings.partitions)
        for acct in accounts:
            await books.assert_balanced(acct)
            state = await books.read(acct)
            # each of the 10 sessions used 7_000 octets: 7 KiB, charged once
            assert state.charged == 10 * 7_000 and state.reserved == 0, acct
        await books.redis.aclose()
    finally:
        for server in servers:
            server.kill()
            server.wait()


async def test_report_and_reconcile_after_the_faults(durable_redis: RedisProcess,
                                                      settings: Settings, tmp_path: Path) -> None:
    redis = SyncRedis.from_url(durable_redis.url)
    sink = open_sink(f"sqlite:///{tmp_path / 'cdrs.db'}")
    Exporter(redis, settings.partitions, sink).drain()
    checked, problems = reconcile(redis, settings.partitions, sink)
    REPORT.reconciled_accounts, REPORT.discrepancies = checked, len(problems)
    print(f"\nfault run: {REPORT.requests} requests, faults injected "
          f"{dict(REPORT.faults)}, {REPORT.retransmissions} retransmissions, reconcile: "
          f"{checked} accounts, {len(problems)} discrepancies")
    sink.close()
    redis.close()
    assert problems == [] and checked > 0
