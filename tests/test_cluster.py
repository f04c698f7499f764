"""The charging scenarios, a load and the notification stream on a local Redis Cluster of
three masters: every script touches one hash slot, so they run unchanged."""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
from creditline.api.app import (
    MIN_REDIS_VERSION,
    RunningServer,
    info_of_every_node,
    redis_versions,
    start_server,
    stop_server,
    version_tuple,
)
from creditline.settings import Settings
from creditline.store.store import account_keys, claim_key, partition_tag
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio.cluster import RedisCluster as ClusterClient

from tests import (
    test_concurrency,
    test_events,
    test_hostile_ids,
    test_schedule,
    test_sessions,
    test_tariffs,
)
from tests.books import Books
from tests.cluster import RedisCluster
from tests.stream_client import StreamCharging

SCENARIOS = [
    *(f for name, f in inspect.getmembers(test_sessions, inspect.iscoroutinefunction)
      if name.startswith("test_")),
    *(f for name, f in inspect.getmembers(test_events, inspect.iscoroutinefunction)
      if name.startswith("test_")),
    *(f for name, f in inspect.getmembers(test_tariffs, inspect.iscoroutinefunction)
      if name.startswith("test_")),
    test_concurrency.test_hundred_concurrent_sessions_never_exceed_the_credit_limit,
    test_schedule.test_lua_grants_match_the_python_inverse,
    # hostile ids, and a session id open on two accounts (in two hash slots: the claim)
    *test_hostile_ids.CLUSTER_SCENARIOS,
]
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as running:
        yield running


@pytest.fixture(scope="module")
async def cluster_server(cluster: RedisCluster, settings: Settings
                         ) -> AsyncIterator[RunningServer]:
    # a long deadline: these tests are about what is charged, and a hundred first calls at
    # once (slot maps, connections to three nodes) can take seconds on a loaded machine
    running = await start_server(replace(settings, redis_cluster=True, redis_call_timeout_s=10.0),
                                 cluster.url)
    yield running
    await stop_server(running, grace_s=1.0)


@pytest.fixture(scope="module")
async def cluster_channel(cluster_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster_server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
async def cluster_redis(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient.from_url(cluster.url, decode_responses=True)
    yield client
    await client.aclose()


def _account_maker(admin: admin_pb2_grpc.AdminStub, books: Books) -> Callable[..., Any]:
    async def make(balance_micros: int = 0, credit_limit_micros: int = 0,
                   buckets: list[admin_pb.Bucket] | None = None) -> str:
        account_id = f"c-{next(_numbers)}"
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=account_id, initial_balance_micros=balance_micros,
            credit_limit_micros=credit_limit_micros, buckets=buckets or []))
        books.track(account_id)
        return account_id
    return make


@pytest.mark.parametrize("transport", ["unary", "stream"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
async def test_scenario_on_cluster(scenario: Callable[..., Any], transport: str,
                                   cluster_channel: grpc.aio.Channel,
                                   cluster_server: RunningServer,
                                   cluster_redis: ClusterClient, settings: Settings) -> None:
    stub = charging_pb2_grpc.ChargingStub(cluster_channel)
    charging: Any = stub if transport == "unary" else StreamCharging(stub)
    admin = admin_pb2_grpc.AdminStub(cluster_channel)
    books = Books(cluster_redis, settings.partitions)  # type: ignore[arg-type]
    fixtures = {"charging": charging, "admin": admin, "books": books,
                "checked_books": books, "make_account": _account_maker(admin, books),
                "server": cluster_server, "redis": cluster_redis, "settings": settings}
    wanted = inspect.signature(scenario).parameters
    await scenario(**{name: fixtures[name] for name in wanted})
    await books.assert_balanced()
    if transport == "stream":
        await charging.close()


async def test_notifications_on_cluster(cluster_channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminStub(cluster_channel)
    notifications = notifications_pb2_grpc.NotificationsStub(cluster_channel)
    accounts = [f"n-{n}" for n in range(20)]  # spread over the partitions and the nodes
    call = notifications.Subscribe(npb.SubscribeRequest(event_types=[npb.TOP_UP]))
    await asyncio.wait_for(call.initial_metadata(), 10)
    for acct in accounts:
        await admin.CreateAccount(admin_pb.CreateAccountRequest(account_id=acct))
        await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=7,
                                                top_up_id="t"))
    events = [await asyncio.wait_for(call.read(), 10) for _ in accounts]
    assert sorted(e.account_id for e in events) == sorted(accounts)
    call.cancel()


async def test_the_version_check_reads_every_node_of_a_cluster(
        cluster_redis: ClusterClient) -> None:
    # a cluster's INFO comes per node: each node's version is checked, none skipped
    versions = redis_versions(await info_of_every_node(cluster_redis))
    assert len(versions) == len(cluster_redis.get_nodes()) >= 3
    assert all(version_tuple(v) >= MIN_REDIS_VERSION for v in versions)
    # what the check compares: 6.0 lacks MINID trimming, 6.2 is the oldest that serves
    assert version_tuple("6.0.16") < MIN_REDIS_VERSION <= version_tuple("6.2.0")
    assert version_tuple("7.2-rc1") == (7,)


async def test_hostile_ids_leave_their_keys_in_their_partitions_slot(
        cluster_redis: ClusterClient, settings: Settings) -> None:
    # the cluster's own hashing (CLUSTER KEYSLOT): the first {...} of a key is the
    # partition's tag, whatever braces an id holds after it
    async def slot(key: str) -> int:
        return int(await cluster_redis.cluster_keyslot(key))

    for account_id in test_hostile_ids.hostile_account_ids(""):
        keys = account_keys(account_id, settings.partitions)
        tag_slot = await slot(partition_tag(keys.partition))
        assert await slot(keys.account) == await slot(keys.index) == tag_slot
        for session_id in test_hostile_ids.HOSTILE_SESSION_IDS:
            assert await slot(keys.session(session_id)) == tag_slot, session_id
            assert await slot(keys.event(session_id)) == tag_slot, session_id
            claim = claim_key(session_id, settings.partitions)
            assert await slot(claim) == await slot(claim[:claim.index("}") + 1])
