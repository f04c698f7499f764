"""The transports (store/transport.py) give one reply shape and one error kind, whichever
the settings choose; a server on redis-py (redis_fast_path off) charges, notifies and
supervises as on the lean path (the other tests run on the lean one)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server, transport_for
from creditline.errors import CreditlineError, ScriptError
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.store.transport import Transport
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio import Redis

from tests.books import Books
from tests.messages import RG_WEB, block, ccr

SCRIPT = "return {ARGV[1], tonumber(ARGV[2]), redis.call('HMGET', KEYS[1], 'a', 'b')}"
LIBRARY = ("#!lua name=creditline_test\nredis.register_function('creditline_test', "
           "function(keys, args) return {args[1], redis.call('HGET', keys[1], 'a')} end)")


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    with RedisProcess() as process:
        yield process


async def _replies(transport: Transport, functions: bool) -> list[object]:
    key, stream = "cl:{1}:h", "cl:{1}:events"
    await transport.command(key, "HSET", key, "a", "x")
    await transport.command(stream, "XADD", stream, "1-1", "a", "acct", "n", "1")
    sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
    # (Redis 7: a function not found, its library loaded, and called again)
    called = [await transport.fcall("creditline_test", LIBRARY, [key], ["f"])] if functions \
        else []
    return [
        *called,
        await transport.evalsha(sha, SCRIPT, [key], ["text", 7]),  # NOSCRIPT, then loaded
        await transport.command(key, "HMGET", key, "a", "b"),
        await transport.command(stream, "XREAD", "COUNT", 10, "STREAMS", stream, "0-0"),
        await transport.command(stream, "XRANGE", stream, "-", "+", "COUNT", 1),
        await transport.command(key, "ZRANGEBYSCORE", "cl:{1}:z", "-inf", 5, "LIMIT", 0, 3),
    ]


async def test_every_transport_gives_replies_and_errors_in_one_shape(
        own_redis: RedisProcess) -> None:
    lean = transport_for(own_redis.url, Settings())
    redis_py = transport_for(own_redis.url, Settings(redis_fast_path=False))
    assert lean.bounded and not redis_py.bounded  # the two kinds
    admin = Redis.from_url(own_redis.url)
    functions = int((await admin.info("server"))["redis_version"].split(".")[0]) >= 7
    try:
        lean_replies = await _replies(lean, functions)
        await admin.flushall()
        await admin.script_flush()
        if functions:
            await admin.function_flush()
        assert await _replies(redis_py, functions) == lean_replies == [
            *([[b"f", b"x"]] if functions else []), [b"text", 7, [b"x", None]], [b"x", None],
            [[b"cl:{1}:events", [[b"1-1", [b"a", b"acct", b"n", b"1"]]]]],
            [[b"1-1", [b"a", b"acct", b"n", b"1"]]], []]
        for transport in (lean, redis_py):
            with pytest.raises(ScriptError, match="WRONGTYPE") as refused:
                await transport.command("cl:{1}:h", "LPUSH", "cl:{1}:h", "x")
            assert isinstance(refused.value, CreditlineError)
    finally:
        await lean.aclose()
        await redis_py.aclose()
        await admin.aclose()


@pytest.fixture
async def redis_py_server(own_redis: RedisProcess, settings: Settings
                          ) -> AsyncIterator[RunningServer]:
    running = await start_server(replace(settings, redis_fast_path=False), own_redis.url)
    yield running
    await stop_server(running, grace_s=1.0)


async def test_a_server_on_redis_py_charges_notifies_and_supervises(
        redis_py_server: RunningServer, own_redis: RedisProcess, settings: Settings) -> None:
    assert not redis_py_server.transport.bounded  # redis-py's
    redis = Redis.from_url(own_redis.url, decode_responses=True)
    books = Books(redis, settings.partitions)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{redis_py_server.port}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        charging = charging_pb2_grpc.ChargingStub(channel)
        call = notifications_pb2_grpc.NotificationsStub(channel).Subscribe(
            npb.SubscribeRequest(event_types=[npb.TOP_UP]))
        await asyncio.wait_for(call.initial_metadata(), 10)
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id="py", initial_balance_micros=1_000_000))
        books.track("py")
        await admin.TopUp(admin_pb.TopUpRequest(account_id="py", amount_micros=5,
                                                top_up_id="t"))
        assert (await asyncio.wait_for(call.read(), 10)).account_id == "py"
        call.cancel()
        answer = await charging.Initial(ccr("py;1", "py", 0, block(RG_WEB, requested=1_024)))
        assert answer.result_code == pb.SUCCESS
    # supervision's reads and its close, through the same transport (as if far later)
    store, later_ms = redis_py_server.store, int(time.time() * 1000) + 10**9
    due = [found for partition in range(settings.partitions)
           for found in await store.due_sessions(partition, later_ms, 10)]
    assert due == [("py", "py;1")]
    assert await store.close_if_stale("py", "py;1", later_ms)
    await books.assert_balanced()
    await redis.aclose()
