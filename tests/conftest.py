"""Fixtures: a real redis-server process and a real Creditline server on an ephemeral
port, called through the generated stubs. No fakes."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server
from creditline.books.cdr import open_sink
from creditline.books.reconcile import reconcile
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.store.store import META_KEY, recorded_partitions
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, notifications_pb2_grpc
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from tests.books import Books
from tests.cluster import RedisCluster
from tests.stream_client import charging_over

_account_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process
        _reconcile_everything(process, tmp_path_factory.mktemp("reconcile"))


def _reconcile_everything(process: RedisProcess, directory: Path) -> None:
    """After the whole run: `creditline reconcile`'s check over every account that every
    test made on the shared Redis (nothing exported: all the CDRs are in the streams)."""
    redis = SyncRedis.from_url(process.url)
    try:
        if redis.exists(META_KEY):
            sink = open_sink(f"sqlite:///{directory / 'cdrs.db'}")
            checked, problems = reconcile(redis, recorded_partitions(redis), sink)
            sink.close()
            assert problems == [], (checked, [str(p) for p in problems[:20]])
    finally:
        redis.close()


@pytest.fixture(scope="session")
def settings() -> Settings:
    # max_event_age_s: the tariff tests price usage at fixed dates of the past (bands,
    # billing periods); tests/test_money_rules.py checks the default window on its own server
    return Settings(listen_address="127.0.0.1:0", answer_retention_s=600,
                    plan_path=str(Path(__file__).parent / "plan.toml"),
                    max_event_age_s=3650 * 86_400)


@pytest.fixture(scope="session")
async def server(redis_process: RedisProcess, settings: Settings) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, redis_process.url)
    yield running
    await stop_server(running, grace_s=1.0)


@pytest.fixture(scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="session", params=["unary", "stream"])
async def charging(request: pytest.FixtureRequest, channel: grpc.aio.Channel
                   ) -> AsyncIterator[Any]:
    """The Charging service, through the unary RPCs and through Charging.Stream: every
    scenario runs on both."""
    async with charging_over(channel, request.param) as charging:
        yield charging


@pytest.fixture(scope="session")
def admin(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


@pytest.fixture(scope="session")
async def redis(redis_process: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_process.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def books(redis: Redis, settings: Settings) -> Books:
    return Books(redis, settings.partitions)


@pytest.fixture
def new_account_id(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh account id per call, unique across the session (no flush between tests)."""
    yield f"t{os.getpid()}-{next(_account_numbers)}"


@pytest.fixture
def make_account(admin: admin_pb2_grpc.AdminStub, books: Books):  # type: ignore[no-untyped-def]
    async def make(balance_micros: int = 0, credit_limit_micros: int = 0,
                   buckets: list[admin_pb.Bucket] | None = None,
                   low_balance_thresholds_micros: list[int] | None = None) -> str:
        account_id = f"t{os.getpid()}-{next(_account_numbers)}"
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=account_id, initial_balance_micros=balance_micros,
            credit_limit_micros=credit_limit_micros, buckets=buckets or [],
            low_balance_thresholds_micros=low_balance_thresholds_micros or []))
        books.track(account_id)
        return account_id
    return make


@pytest.fixture
async def checked_books(books: Books) -> AsyncIterator[Books]:
    """Books that are checked after the test: every account it made must balance."""
    yield books
    await books.assert_balanced()


def settings_with(settings: Settings, **changes: object) -> Settings:
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def notifications(channel: grpc.aio.Channel) -> notifications_pb2_grpc.NotificationsStub:
    return notifications_pb2_grpc.NotificationsStub(channel)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault run says what it did, in every run that included it (CI's too)."""
    import sys

    faults = sys.modules.get("tests.test_faults")
    if faults is not None and faults.REPORT.requests:
        r = faults.REPORT
        terminalreporter.write_sep("-", "fault run")
        terminalreporter.write_line(
            f"requests served {r.requests}; faults injected {dict(r.faults)}; "
            f"retransmissions {r.retransmissions}; reconcile: {r.reconciled_accounts} "
            f"accounts, {r.discrepancies} discrepancies")


class Backend(NamedTuple):
    url: str
    cluster: bool


@pytest.fixture(scope="module", params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest, redis_process: RedisProcess) -> Iterator[Backend]:
    """Every scenario of a module that asks for it on one Redis and on a Redis Cluster of
    three masters."""
    if request.param == "redis":
        yield Backend(redis_process.url, cluster=False)
        return
    with RedisCluster(masters=3) as cluster:
        yield Backend(cluster.url, cluster=True)


@pytest.fixture(scope="module")
async def backend_redis(backend: Backend) -> AsyncIterator[Redis | ClusterClient]:
    client: Redis | ClusterClient = (
        ClusterClient.from_url(backend.url, decode_responses=True) if backend.cluster
        else Redis.from_url(backend.url, decode_responses=True))
    yield client
    await client.aclose()


@pytest.fixture
def backend_books(backend_redis: Redis | ClusterClient) -> Books:
    return Books(backend_redis, Settings().partitions)
