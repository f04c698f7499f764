"""A session's state per rating group, as the charging script keeps it in the session hash
(creditline.store.contract SESSION_RATING_GROUP_*): what the Python side decodes is what
the answers said, and a session that an older version wrote field by field (u:, c:, m:, ...)
goes on and closes with nothing lost, written back in the packed form."""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from creditline.books.cdr import open_sink
from creditline.books.reconcile import reconcile
from creditline.store.contract import (
    SESSION_RATING_GROUP_FORMAT,
    SESSION_RATING_GROUP_PREFIX,
    SessionRatingGroup,
    session_rating_groups,
)
from creditline.store.redis_process import RedisProcess
from creditline.store.store import (
    account_keys,
    admin_script_source,
    charge_script_source,
    recorded_partitions,
)
from creditline.v1 import charging_pb2 as pb
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from tests.books import Books
from tests.messages import RG_VOICE, RG_WEB, block, ccr, granted, rg_answer

CHARGE_LUA = charge_script_source()


@pytest.fixture
async def binary_redis(redis_process: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_process.url)  # bytes: the states are binary
    yield client
    await client.aclose()


def test_the_script_packs_the_state_as_the_contract_says() -> None:
    match = re.search(r"^local RG_STATE_PREFIX, RG_STATE_FIELD = '([^']+)', '\^([^(]+)\(",
                      CHARGE_LUA, re.MULTILINE)
    assert match and match[1] == match[2] == SESSION_RATING_GROUP_PREFIX
    # (admin.lua finds a session's rating groups by the same field names: ChangePlan)
    admin = admin_script_source()
    assert f"local RG_STATE_FIELD = '^{SESSION_RATING_GROUP_PREFIX}(.+)$'" in admin
    match = re.search(r"^local RG_STATE_FORMAT, RG_STATE_BYTES = '([^']+)', (\d+)$",
                      CHARGE_LUA, re.MULTILINE)
    assert match and match[1] == SESSION_RATING_GROUP_FORMAT
    assert int(match[2]) == struct.calcsize(SESSION_RATING_GROUP_FORMAT)


async def test_the_decoded_state_is_what_the_answers_said(  # type: ignore[no-untyped-def]
        charging, make_account, binary_redis: Redis, settings, checked_books: Books) -> None:
    acct = await make_account(10_000_000)
    sid = f"{acct};state"
    await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                               block(RG_VOICE, requested=300)))
    answer = await charging.Update(ccr(sid, acct, 1, block(RG_WEB, used=5_000, requested=4_096),
                                       block(RG_VOICE, used=90, requested=60)))
    keys = account_keys(acct, settings.partitions)
    states = session_rating_groups(await binary_redis.hgetall(keys.session(sid)))
    web, voice = states[str(RG_WEB)], states[str(RG_VOICE)]
    assert (web.used, web.charged) == (5_000, rg_answer(answer, RG_WEB).charged_micros)
    assert (voice.used, voice.charged) == (90, rg_answer(answer, RG_VOICE).charged_micros)
    assert web.tariff.endswith(f"/{RG_WEB}") and web.bucket_rating_group == str(RG_WEB)
    account_reserved = int(await binary_redis.hget(keys.account, "reserved") or 0)
    assert web.reserved + voice.reserved == account_reserved > 0
    assert granted(answer, RG_WEB) == 4_096


def _legacy_fields(rg: str, state: SessionRatingGroup) -> dict[str, str | int]:
    """A rating group as versions before the packed state wrote it."""
    return {f"u:{rg}": state.used, f"c:{rg}": state.charged, f"fb:{rg}": state.from_buckets,
            f"x:{rg}": state.uncharged, f"m:{rg}": state.reserved,
            f"r:{rg}": state.used - state.from_buckets, f"k:{rg}": state.bucket_rating_group,
            f"tf:{rg}": state.tariff}


def _reconciled(redis_process: RedisProcess, directory: Path) -> list[str]:
    """`creditline reconcile`'s problems over the whole Redis (nothing exported)."""
    redis = SyncRedis.from_url(redis_process.url)
    sink = open_sink(f"sqlite:///{directory / 'cdrs.db'}")
    try:
        return [str(p) for p in reconcile(redis, recorded_partitions(redis), sink)[1]]
    finally:
        sink.close()
        redis.close()


async def test_a_session_an_older_version_wrote_goes_on_and_closes(  # type: ignore[no-untyped-def]
        charging, make_account, binary_redis: Redis, settings, checked_books: Books,
        redis_process: RedisProcess, tmp_path: Path) -> None:
    acct = await make_account(10_000_000)
    sid = f"{acct};legacy"
    await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                               block(RG_VOICE, requested=300)))
    await charging.Update(ccr(sid, acct, 1, block(RG_WEB, used=5_000, requested=10_240),
                              block(RG_VOICE, used=90, requested=300)))
    key = account_keys(acct, settings.partitions).session(sid)
    states = session_rating_groups(await binary_redis.hgetall(key))
    for rg, state in states.items():  # turned into the older version's fields
        await binary_redis.hdel(key, f"{SESSION_RATING_GROUP_PREFIX}{rg}")
        await binary_redis.hset(key, mapping=_legacy_fields(rg, state))
    await checked_books.assert_balanced()  # (the books read both forms)
    assert await asyncio.to_thread(_reconciled, redis_process, tmp_path) == []  # and reconcile
    answer = await charging.Update(ccr(sid, acct, 2, block(RG_WEB, used=3_000, requested=10_240),
                                       block(RG_VOICE, used=30, requested=300)))
    assert answer.result_code == pb.SUCCESS
    fields = await binary_redis.hgetall(key)
    assert not [f for f in fields if re.match(rb"(u|c|fb|x|m|b|bl|k|tf|r):", f)]
    now = session_rating_groups(fields)
    assert now[str(RG_WEB)].used == 8_000 and now[str(RG_VOICE)].used == 120
    assert now[str(RG_WEB)].charged == states[str(RG_WEB)].charged + rg_answer(
        answer, RG_WEB).charged_micros
    answer = await charging.Terminate(ccr(sid, acct, 3, block(RG_WEB, used=1_000)))
    assert answer.result_code == pb.SUCCESS
    assert int(await binary_redis.hget(account_keys(acct, settings.partitions).account,
                                       "reserved") or 0) == 0
