"""The benchmark driver against a real server and Redis for a few seconds: every request
answered with success, no errors, every request one EVALSHA (counted by Redis), and the
books balanced afterwards with no money left reserved. No timing assertions: the machine
is shared."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from creditline.api.app import RunningServer
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb
from redis.asyncio import Redis

from bench import redis_stats
from bench.baseline_server import start_baseline_server
from bench.driver import (
    CLOSED_LOOP,
    OPEN_LOOP,
    STREAM,
    UNARY,
    DriverConfig,
    DriverResult,
    drive,
)
from bench.histogram import LatencyHistogram
from bench.workload import METHODS, Workload, event_request
from tests.books import Books

_prefixes = itertools.count(1)


async def _accounts(admin, books: Books) -> Workload:  # type: ignore[no-untyped-def]
    # a prefix of its own: the test Redis is shared by the session and never flushed
    workload = Workload(account_count=20, hot_account_count=2, hot_share=0.3,
                        account_prefix=f"bench{os.getpid()}x{next(_prefixes)}")
    for account_id, balance_micros in workload.all_accounts():
        await admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=account_id, initial_balance_micros=balance_micros))
        books.track(account_id)
    return workload


async def _drive_counted(config: DriverConfig, charging, redis: Redis  # type: ignore[no-untyped-def]
                         ) -> tuple[DriverResult, redis_stats.RoundTrips]:
    # one request first, so that the charging script is loaded before the count starts
    warm = await charging.Event(event_request(f"warm-{config.run_tag}",
                                              config.workload.account_id(0)))
    assert warm.result_code == pb.SUCCESS
    before = await redis_stats.command_calls(redis)
    result = await drive(config)
    after = await redis_stats.command_calls(redis)
    trips = redis_stats.round_trips(before, after, result.requests_total,
                                    redis_stats.script_commands())
    return result, trips


def _assert_all_served(result: DriverResult, trips: redis_stats.RoundTrips) -> None:
    summary = result.summary()
    assert result.error_count == 0, summary["errors_by_kind"]
    assert result.shed == 0
    assert result.requests > 0
    for method in METHODS:
        assert set(result.result_codes[method]) == {pb.SUCCESS}, summary["result_codes"]
    assert result.success_count() == result.requests
    # Redis saw exactly one script call per request (FCALL, or EVALSHA where Redis has no
    # functions), and the scripts' own commands beside it (on one Redis server the session
    # id's claims are taken and given back inside it)
    script_calls = trips.by_command.get("fcall", 0) + trips.by_command.get("evalsha", 0)
    assert script_calls == result.requests_total, trips.summary()
    assert trips.in_script_commands > result.requests_total
    # one round trip per request; new pool connections' handshakes are counted apart
    assert trips.per_request == 1.0, trips.summary()


async def _assert_nothing_reserved(admin, books: Books, workload: Workload  # type: ignore[no-untyped-def]
                                   ) -> None:
    await books.assert_balanced()
    for account_id, _ in workload.all_accounts():
        account = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert account.reserved_micros == 0 and account.open_sessions == 0, account


async def test_closed_loop_against_the_server(server: RunningServer, charging, admin,  # type: ignore[no-untyped-def]
                                              redis: Redis, books: Books) -> None:
    workload = await _accounts(admin, books)
    config = DriverConfig(target=f"127.0.0.1:{server.port}", mode=CLOSED_LOOP,
                          duration_s=2.0, warmup_s=0.3, concurrency=8, run_tag="smoke-closed",
                          workload=workload)
    result, trips = await _drive_counted(config, charging, redis)
    _assert_all_served(result, trips)
    assert result.histograms["Initial"].count > 0 and result.histograms["Event"].count > 0
    await _assert_nothing_reserved(admin, books, workload)


async def test_open_loop_closes_its_sessions(server: RunningServer, charging, admin,  # type: ignore[no-untyped-def]
                                             redis: Redis, books: Books) -> None:
    workload = await _accounts(admin, books)
    config = DriverConfig(target=f"127.0.0.1:{server.port}", mode=OPEN_LOOP,
                          duration_s=1.5, warmup_s=0.2, rate_rps=150.0, run_tag="smoke-open",
                          workload=workload)
    result, trips = await _drive_counted(config, charging, redis)
    _assert_all_served(result, trips)
    assert result.from_due.count == result.requests
    # sessions still open when the window closed were terminated by the driver
    await _assert_nothing_reserved(admin, books, workload)


async def test_stream_transport_closed_loop(server: RunningServer, charging, admin,  # type: ignore[no-untyped-def]
                                            redis: Redis, books: Books) -> None:
    # the same flows multiplexed over 3 Charging.Stream calls per process
    workload = await _accounts(admin, books)
    config = DriverConfig(target=f"127.0.0.1:{server.port}", mode=CLOSED_LOOP,
                          duration_s=2.0, warmup_s=0.3, concurrency=12, run_tag="smoke-stream",
                          transport=STREAM, streams_per_process=3, workload=workload)
    result, trips = await _drive_counted(config, charging, redis)
    _assert_all_served(result, trips)
    assert result.histograms["Update"].count > 0 and result.histograms["Event"].count > 0
    await _assert_nothing_reserved(admin, books, workload)


async def test_stream_transport_open_loop_closes_its_sessions(  # type: ignore[no-untyped-def]
        server: RunningServer, charging, admin, redis: Redis, books: Books) -> None:
    workload = await _accounts(admin, books)
    config = DriverConfig(target=f"127.0.0.1:{server.port}", mode=OPEN_LOOP,
                          duration_s=1.5, warmup_s=0.2, rate_rps=150.0,
                          run_tag="smoke-stream-open", transport=STREAM, workload=workload)
    result, trips = await _drive_counted(config, charging, redis)
    _assert_all_served(result, trips)
    await _assert_nothing_reserved(admin, books, workload)


async def test_baseline_server_answers_both_transports() -> None:
    server, port = await start_baseline_server("127.0.0.1:0")
    try:
        for transport in (UNARY, STREAM):
            config = DriverConfig(target=f"127.0.0.1:{port}", mode=CLOSED_LOOP,
                                  duration_s=0.5, warmup_s=0.1, concurrency=8,
                                  transport=transport, workload=Workload(account_count=5))
            result = await drive(config)
            assert result.error_count == 0, result.summary()["errors_by_kind"]
            assert result.requests > 0 and result.success_count() == result.requests
    finally:
        await server.stop(None)


async def test_round_trip_floor_runs_one_evalsha_per_unary_call() -> None:
    # the floor's claim: every unary call made exactly one Redis round trip (a Redis of
    # its own: the shared one also serves other servers' supervision sweeps)
    config = DriverConfig(target="", mode=CLOSED_LOOP, duration_s=0.5, warmup_s=0.1,
                          concurrency=8, workload=Workload(account_count=5))
    with RedisProcess() as redis_process:
        async with Redis.from_url(redis_process.url, decode_responses=True) as redis:
            server, port = await start_baseline_server("127.0.0.1:0", redis_process.url)
            try:
                before = await redis_stats.command_calls(redis)
                result = await drive(replace(config, target=f"127.0.0.1:{port}"))
                after = await redis_stats.command_calls(redis)
            finally:
                await server.stop(None)
    assert result.error_count == 0, result.summary()["errors_by_kind"]
    assert result.requests > 0 and result.success_count() == result.requests
    evalshas = after.get("evalsha", 0) - before.get("evalsha", 0)
    # calls still in flight when the window closed made theirs too (at most one a flow)
    assert result.requests_total <= evalshas <= result.requests_total + config.concurrency


def test_lean_path_comparison_runs_on_plain_auth_and_tls() -> None:
    """bench/lean_secure.py, a few flows: the three Redis servers start, each charges on
    the lean path (it stops when the path would not apply)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.lean_secure", "--sessions", "20", "--rounds", "1"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=120, check=False)
    if "no redis-server built with TLS" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(f"  {name} " in result.stdout for name in ("plain", "auth", "tls+auth"))


def test_plans_bench_counts_second_round_trips() -> None:
    """bench/plans_bench.py, small: a server that has seen no account prices each one's
    first request again (accounts off the default plan: 2 of 3 here), then none; a changed
    plan costs its account's next request one more."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.plans_bench", "--plans", "3", "--accounts", "30",
         "--rounds", "3", "--changed", "0.1"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round 1: 180 requests, 200 script calls" in result.stdout
    assert "round 2: 180 requests, 180 script calls: 0.00 %" in result.stdout
    assert "(3 accounts changed plan)" in result.stdout
    assert "round 3: 180 requests, 183 script calls" in result.stdout


def test_diameter_bench_runs_every_transport_without_failures(tmp_path: Path) -> None:
    """bench/diameter_bench.py, tiny: `creditline serve` (uvloop, its Diameter listener)
    answers CCR-U over one connection, and gRPC Update unary and streamed, every answer
    2001, the same script work per request, and the books balanced afterwards."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.diameter_bench", "--duration-s", "0.5", "--warmup-s",
         "0.2", "--rounds", "1", "--accounts", "20", "--in-flight", "8",
         "--out", str(tmp_path)],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    [written] = tmp_path.glob("diameter-*.json")
    results = json.loads(written.read_text())
    assert results["failures"] == 0 and not results["teardown_failures"]
    assert results["books"]["mismatches"] == 0, results["books"]
    for transport in ("unary", "stream", "diameter"):
        phase = results["phases"][f"{transport}_round1"]
        assert phase["requests_per_s"] > 0 and phase["answered"] > 0, phase
        assert phase["server_cpu_ms_per_request"] > 0, phase
        assert phase["redis_round_trips_per_request"] == 1.0, phase
    assert results["ratios"]["diameter_to_unary"]["throughput"] > 0
    assert "| Diameter / unary |" in result.stdout


def test_histogram_percentiles_within_one_percent() -> None:
    rng = random.Random(7)
    latencies_s = [rng.expovariate(1 / 0.002) for _ in range(20_000)]
    histogram = LatencyHistogram()
    for latency_s in latencies_s:
        histogram.record_s(latency_s)
    latencies_s.sort()
    for percent in (50, 90, 99):
        exact_ms = latencies_s[int(len(latencies_s) * percent / 100) - 1] * 1000
        assert exact_ms <= histogram.percentile_ms(percent) <= exact_ms * 1.0101 + 1e-3
