"""The lean EVALSHA path's own deadline, against a real redis-server that stops answering
for a while (CLIENT PAUSE): the call fails with TimeoutError after call_timeout_s, and the
late reply is not handed to the next call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from creditline.store.fastredis import FastScriptClient
from creditline.store.redis_process import RedisProcess
from redis.asyncio import Redis

SCRIPT = "return ARGV[1]"
PAUSE_MS = 1_500
CALL_TIMEOUT_S = 0.3


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    # a Redis of its own: CLIENT PAUSE would stall every other user of a shared one
    with RedisProcess() as process:
        yield process


async def test_a_call_past_its_deadline_fails_and_its_late_reply_is_skipped(
        own_redis: RedisProcess) -> None:
    admin = Redis.from_url(own_redis.url)
    client = FastScriptClient(own_redis.url, 2.0, CALL_TIMEOUT_S)
    try:
        sha = str(await admin.script_load(SCRIPT))
        assert await client.evalsha(sha, SCRIPT, [], ["before"]) == b"before"
        await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
        started = time.monotonic()
        late = [asyncio.create_task(client.evalsha(sha, SCRIPT, [], [f"late{n}"]))
                for n in range(3)]
        for call in late:
            with pytest.raises(TimeoutError):
                await call
        waited_s = time.monotonic() - started
        assert CALL_TIMEOUT_S <= waited_s < CALL_TIMEOUT_S + 0.5
        await asyncio.sleep(PAUSE_MS / 1000)
        # after the pause: the late replies (to the calls that failed) are skipped, each
        # call gets its own
        assert await client.evalsha(sha, SCRIPT, [], ["again"]) == b"again"
        assert await asyncio.gather(*(client.evalsha(sha, SCRIPT, [], [str(n)])
                                      for n in range(50))) == [str(n).encode()
                                                               for n in range(50)]
    finally:
        await client.aclose()
        await admin.aclose()
