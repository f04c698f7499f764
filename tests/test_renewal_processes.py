"""Renewal exactly once across processes and restarts: three `creditline serve` processes
on one Redis renew every subscription once at its period end, are stopped, and three
new ones renew once more at the next period end. The clock moves by the processes' own
flag (--clock-offset-s), as an operator would try it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, free_port
from creditline.store.store import cdrs_key, partition_of
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc
from redis.asyncio import Redis

from tests.books import Books
from tests.processes import serve, stop, wait_for_port

CATALOGUE = Path(__file__).parent / "catalogue.toml"
FEE = 100_000  # tests/catalogue.toml: sms-daily, every day
ACCOUNTS = 12
RENEWED_TIMEOUT_S = 30


def _start(redis_url: str, ahead_s: int, count: int = 3) -> list[tuple[int, object]]:
    started = []
    for _ in range(count):
        port = free_port()
        process = serve("--listen-address", f"127.0.0.1:{port}", "--workers", "1",
                        "--redis-url", redis_url, "--plan-path", str(CATALOGUE),
                        "--clock-offset-s", str(ahead_s), "--renewal-interval-s", "0.2")
        started.append((port, process))
    for port, process in started:
        wait_for_port(port, process)  # type: ignore[arg-type]
    return started


def _accounts(port: int, ids: list[str]) -> list[admin_pb.Account]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        return [admin.GetAccount(admin_pb.GetAccountRequest(account_id=a)) for a in ids]


def _wait_for_periods(port: int, ids: list[str], periods: int) -> None:
    deadline = time.monotonic() + RENEWED_TIMEOUT_S
    while time.monotonic() < deadline:
        if all(a.subscriptions[0].periods >= periods for a in _accounts(port, ids)):
            return
        time.sleep(0.2)
    raise AssertionError(f"not every subscription renewed to period {periods}")


async def _fee_records(redis: Redis, account_id: str) -> int:
    entries = await redis.xrange(cdrs_key(partition_of(account_id, Settings().partitions)))
    return sum(1 for _, f in entries if f["account"] == account_id and f["kind"] == "fee")


async def test_three_processes_and_a_restart_renew_each_subscription_once_per_period(
        redis_process: RedisProcess, redis: Redis) -> None:
    ids = [f"renew-{time.time_ns()}-{n}" for n in range(ACCOUNTS)]
    books = Books(redis, Settings().partitions)
    processes = await asyncio.to_thread(_start, redis_process.url, 0, 1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{processes[0][0]}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            for account_id in ids:
                admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=account_id, initial_balance_micros=1_000_000))
                admin.SubscribeToOffer(admin_pb.SubscribeToOfferRequest(
                    account_id=account_id, offer_id="sms-daily"))
                books.track(account_id)
    finally:
        for _, process in processes:
            stop(process)  # type: ignore[arg-type]
    for day in (1, 2):  # a day on, three processes; stopped; another day on, three new
        processes = await asyncio.to_thread(_start, redis_process.url, day * 86_400 + 60)
        try:
            port = processes[0][0]
            await asyncio.to_thread(_wait_for_periods, port, ids, 1 + day)
            await asyncio.sleep(1.0)  # five more sweeps of each process: nothing more
            for account in await asyncio.to_thread(_accounts, port, ids):
                assert account.subscriptions[0].periods == 1 + day, account
                assert account.fees_micros == (1 + day) * FEE, account
                assert account.balance_micros == 1_000_000 - (1 + day) * FEE, account
        finally:
            outputs = [stop(process) for _, process in processes]  # type: ignore[arg-type]
        assert sum(o.count("renewal: ") for o in outputs) >= 1, outputs
    for account_id in ids:
        assert await _fee_records(redis, account_id) == 3
    await books.assert_balanced()
