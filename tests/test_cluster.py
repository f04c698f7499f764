"""The charging scenarios, a load and the notification stream on a local Redis Cluster of
three masters: every script touches one hash slot, so they run unchanged."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import uuid
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
from creditline.store.transport import LeanCluster, key_slot
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from redis import Redis as SyncRedis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.exceptions import AuthenticationError

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
from tests.messages import RG_WEB, block, ccr, rg_answer
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
            # the lean path's slot of a key is the cluster's
            assert key_slot(keys.session(session_id)) == tag_slot
            assert key_slot(claim) == await slot(claim)


async def _accounts_with_a_session(channel: grpc.aio.Channel, books: Books, count: int,
                                   balance_micros: int, tag: str, requested: int) -> list[str]:
    """`count` new accounts, each with a session `<account>;<tag>` opened (SUCCESS)."""
    charging = charging_pb2_grpc.ChargingStub(channel)
    make = _account_maker(admin_pb2_grpc.AdminStub(channel), books)
    accounts = [await make(balance_micros=balance_micros) for _ in range(count)]
    for acct in accounts:
        answer = await charging.Initial(ccr(f"{acct};{tag}", acct, 0,
                                            block(RG_WEB, requested=requested)))
        assert answer.result_code == pb.SUCCESS
    return accounts


def _masters(cluster: RedisCluster, password: str = "") -> dict[int, SyncRedis]:
    return {node.port: SyncRedis(port=node.port, password=password or None)
            for node in cluster.nodes}


def _owner(masters: dict[int, SyncRedis], slot: int) -> int:
    """The port of the node serving a slot (CLUSTER SLOTS)."""
    for start, end, master, *_ in next(iter(masters.values())).execute_command(
            "CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(master[1])
    raise AssertionError(f"slot {slot} is served by no node")


def _asking_calls(node: SyncRedis) -> int:
    stats: dict[str, Any] = node.info("commandstats")
    return int(stats.get("cmdstat_asking", {}).get("calls", 0))


async def test_charging_follows_its_slot_while_it_migrates_to_another_node(
        cluster: RedisCluster, cluster_channel: grpc.aio.Channel, cluster_redis: ClusterClient,
        settings: Settings) -> None:
    # the server's own slot of the account's keys is the cluster's (CRC16 of the tag)
    charging = charging_pb2_grpc.ChargingStub(cluster_channel)
    books = Books(cluster_redis, settings.partitions)  # type: ignore[arg-type]
    acct = await _account_maker(admin_pb2_grpc.AdminStub(cluster_channel), books)(
        balance_micros=100_000_000)
    keys = account_keys(acct, settings.partitions)
    slot = key_slot(keys.account)
    assert slot == await cluster_redis.cluster_keyslot(keys.account)
    masters = _masters(cluster)
    source = _owner(masters, slot)
    target = next(port for port in masters if port != source)
    ids = {port: node.execute_command("CLUSTER", "MYID").decode()
           for port, node in masters.items()}
    sid = f"{acct};migrating"
    answer = await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240)))
    assert answer.result_code == pb.SUCCESS

    # mid-migration, every key of the slot moved: the source answers ASK; the target runs
    # the script once every key it names is there (TRYAGAIN until then: some, the usage
    # say, exist nowhere yet), so the call waits for the migration's end
    masters[target].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    masters[source].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    moving = masters[source].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100_000)
    masters[source].execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                    "KEYS", *moving)
    asked = _asking_calls(masters[target])
    update = asyncio.ensure_future(charging.Update(ccr(
        sid, acct, 1, block(RG_WEB, requested=10_240, used=5_000))))
    await asyncio.sleep(0.3)
    assert _asking_calls(masters[target]) > asked  # ASKING, then the script, on the target
    # migration done: the source answers MOVED, and the server reads the map again
    for node in (masters[target], masters[source], *masters.values()):
        node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    assert (await update).result_code == pb.SUCCESS
    answer = await charging.Terminate(ccr(sid, acct, 2, block(RG_WEB, used=3_000)))
    assert answer.result_code == pb.SUCCESS
    assert rg_answer(answer, RG_WEB).charged_micros == 3_000
    assert masters[source].execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert _owner(masters, slot) == target
    await books.assert_balanced()
    for node in masters.values():
        node.close()


async def test_charging_goes_on_when_a_node_restarts(settings: Settings) -> None:
    # a node killed and started again (its writes kept in its append-only file): its
    # connections reconnect, its script cache is empty (NOSCRIPT, loaded again), and a call
    # made while it is down is answered once it is back
    with RedisCluster(masters=3, persistent=True) as cluster:
        running = await start_server(replace(settings, redis_cluster=True,
                                             redis_call_timeout_s=10.0), cluster.url)
        redis = ClusterClient.from_url(cluster.url, decode_responses=True)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                charging = charging_pb2_grpc.ChargingStub(channel)
                books = Books(redis, settings.partitions)  # type: ignore[arg-type]
                accounts = await _accounts_with_a_session(channel, books, 12, 100_000_000,
                                                          "r", 10_240)
                victim = cluster.nodes[1]
                on_victim = next(acct for acct in accounts if _owner(
                    _masters(cluster), key_slot(account_keys(acct, settings.partitions)
                                                .account)) == victim.port)
                victim.kill()
                while_down = asyncio.ensure_future(charging.Update(ccr(
                    f"{on_victim};r", on_victim, 1, block(RG_WEB, requested=10_240,
                                                          used=1_000))))
                await asyncio.sleep(0.5)
                victim.start()
                cluster.wait_ready()
                assert (await while_down).result_code == pb.SUCCESS
                for acct in accounts:
                    number = 2 if acct == on_victim else 1
                    answer = await charging.Terminate(ccr(f"{acct};r", acct, number,
                                                          block(RG_WEB, used=2_000)))
                    assert answer.result_code == pb.SUCCESS, acct
                await books.assert_balanced()
        finally:
            await redis.aclose()
            await stop_server(running, grace_s=1.0)


async def test_a_cluster_with_a_password_is_charged_on_every_node(settings: Settings) -> None:
    # AUTH on every node's lean connection (else NOAUTH), as on one server; a wrong
    # password is refused as on one server
    password = uuid.uuid4().hex
    with RedisCluster(masters=3) as cluster:
        for node in _masters(cluster).values():
            node.config_set("requirepass", password)
            node.close()
        configured = replace(settings, redis_cluster=True, redis_password=password,
                             redis_call_timeout_s=10.0)
        running = await start_server(configured, cluster.url)
        redis = ClusterClient.from_url(cluster.url, password=password, decode_responses=True)
        try:
            assert running.transport.cluster and running.transport.bounded  # the lean path
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                charging = charging_pb2_grpc.ChargingStub(channel)
                books = Books(redis, settings.partitions)  # type: ignore[arg-type]
                make = _account_maker(admin_pb2_grpc.AdminStub(channel), books)
                accounts = [await make(balance_micros=10_000_000) for _ in range(9)]
                ports = {node.port for node in cluster.nodes}
                owners = {_owner(_masters(cluster, password), key_slot(
                    account_keys(acct, settings.partitions).account)) for acct in accounts}
                assert owners == ports  # every node charged
                for acct in accounts:
                    answer = await charging.Initial(ccr(f"{acct};a", acct, 0,
                                                        block(RG_WEB, requested=4_096)))
                    assert answer.result_code == pb.SUCCESS
                    answer = await charging.Terminate(ccr(f"{acct};a", acct, 1,
                                                          block(RG_WEB, used=2_048)))
                    assert answer.result_code == pb.SUCCESS
                await books.assert_balanced()
        finally:
            await redis.aclose()
            await stop_server(running, grace_s=1.0)
        wrong = LeanCluster(cluster.url, 5.0, 5.0, password="not-" + password)
        with pytest.raises(AuthenticationError):
            await wrong.command("cl:{0}:meta", "GET", "cl:{0}:meta")
        await wrong.aclose()


@pytest.mark.parametrize("fast_path", [True, False], ids=["lean", "redis-py"])
async def test_every_node_runs_the_charging_library_by_fcall(
        fast_path: bool, settings: Settings) -> None:
    """The server loads the charging library on one node at start; every other node gets it
    at its first FCALL that finds it missing (lean path and redis-py's cluster client), and
    from then on each charging request is one FCALL there."""
    with RedisCluster(masters=3) as cluster:
        configured = replace(settings, redis_cluster=True, redis_fast_path=fast_path,
                             redis_call_timeout_s=10.0)
        running = await start_server(configured, cluster.url)
        redis = ClusterClient.from_url(cluster.url, decode_responses=True)
        try:
            assert running.store.charge_operation == "FCALL"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                books = Books(redis, settings.partitions)  # type: ignore[arg-type]
                accounts = await _accounts_with_a_session(channel, books, 9, 10_000_000,
                                                          "f", 4_096)
                await books.assert_balanced()
            masters = _masters(cluster)
            owners = {_owner(masters, key_slot(account_keys(acct, settings.partitions).account))
                      for acct in accounts}
            assert owners == set(masters)  # every node charged
            for node in masters.values():
                assert node.execute_command("FUNCTION", "LIST"), node  # the library is there
                assert node.info("commandstats")["cmdstat_fcall"]["calls"] >= 1
                node.close()
        finally:
            await redis.aclose()
            await stop_server(running, grace_s=1.0)
