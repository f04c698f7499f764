"""Garbage in: Hypothesis-generated requests (missing and absurd fields, huge numbers, long
and odd ids, thousands of rating groups, wrong request numbers) and raw malformed bytes,
against a real server process. Never INTERNAL or UNKNOWN, never a charge for a refused
request, and the books reconcile afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from creditline.books.cdr import open_sink
from creditline.books.exporter import Exporter
from creditline.books.reconcile import reconcile
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

PLAN = str(Path(__file__).parent / "plan.toml")
ACCOUNTS = [f"fuzz-{n}" for n in range(3)]
REFUSALS = {pb.INVALID_AVP_VALUE, pb.MISSING_AVP, pb.USER_UNKNOWN, pb.UNKNOWN_SESSION_ID}
# gRPC statuses a garbage request may get; INTERNAL and UNKNOWN never
ALLOWED_STATUSES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class FuzzTarget:
    redis: RedisProcess
    channel: grpc.Channel
    charging: charging_pb2_grpc.ChargingStub
    admin: admin_pb2_grpc.AdminStub


# The server's log: a failure names what the server saw (a "redis call failed" warning).
SERVER_LOG = Path(tempfile.gettempdir()) / f"creditline-fuzz-server-{os.getpid()}.log"


def _serve(redis_url: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITLINE_")}
    with SERVER_LOG.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "creditline", "serve", "--workers", "1", "--redis-url",
             redis_url, "--listen-address", f"127.0.0.1:{port}", "--plan-path", PLAN,
             # the tests are about what is answered and charged, not about latency: a
             # long deadline, so that a loaded machine does not turn into 5012 answers
             "--redis-call-timeout-s", "10", *extra],
            env=env, stdout=log, stderr=log)


def _server_log_tail() -> str:
    return SERVER_LOG.read_text(errors="replace")[-2_000:] if SERVER_LOG.exists() else ""


@pytest.fixture(scope="module")
def target() -> Iterator[FuzzTarget]:
    with RedisProcess() as redis:
        port = free_port()
        server = _serve(redis.url, port)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            admin = admin_pb2_grpc.AdminStub(channel)
            for account in ACCOUNTS:
                admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=account, initial_balance_micros=10**9, credit_limit_micros=10**6))
            yield FuzzTarget(redis, channel, charging_pb2_grpc.ChargingStub(channel), admin)
        finally:
            channel.close()
            server.terminate()
            server.wait(30)


units = st.one_of(st.integers(0, 10_000), st.integers(0, 2**64 - 1),
                  st.sampled_from([2**53 - 1, 2**53, 2**63, 2**64 - 1]))


@st.composite
def unit_blocks(draw: st.DrawFn) -> pb.Units:
    message = pb.Units()
    for field in ("time_s", "total_octets", "uplink_octets", "downlink_octets",
                  "service_specific_units"):
        if draw(st.booleans()):
            setattr(message, field, draw(units))
    return message


@st.composite
def rating_group_blocks(draw: st.DrawFn) -> pb.RatingGroupRequest:
    block = pb.RatingGroupRequest(
        rating_group=draw(st.sampled_from([10, 20, 100, 300, 900, 55, 0, 2**32 - 1])),
        reporting_reason=draw(st.integers(-3, 20)))
    if draw(st.booleans()):
        block.service_id = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        block.requested.CopyFrom(draw(unit_blocks()))
    if draw(st.booleans()):
        block.used.CopyFrom(draw(unit_blocks()))
    return block


ids = st.one_of(st.text(max_size=300), st.sampled_from(["", "s", "x" * 257, "a{b}", "\x00",
                                                         "\ud7ff\ue000\U0010ffff"]))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, pb.CreditControlRequest]:
    method = draw(st.sampled_from(["Initial", "Update", "Terminate"]))
    count = draw(st.one_of(st.integers(0, 4), st.integers(60, 70), st.just(3_000)))
    blocks = [draw(rating_group_blocks())] * count if count > 10 else [
        draw(rating_group_blocks()) for _ in range(count)]
    request = pb.CreditControlRequest(
        session_id=draw(st.one_of(st.sampled_from(["fz-1", "fz-2"]), ids)),
        request_number=draw(st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))),
        account_id=draw(st.one_of(st.sampled_from(ACCOUNTS), ids)),
        event_time_unix_ms=draw(st.one_of(st.just(0), st.integers(-2**63, 2**63 - 1))),
        rating_groups=blocks)
    return method, request


def _balances(target: FuzzTarget) -> dict[str, tuple[int, int]]:
    result = {}
    for account in ACCOUNTS:
        state = target.admin.GetAccount(admin_pb.GetAccountRequest(account_id=account))
        result[account] = (state.balance_micros, state.reserved_micros)
    return result


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(requests())
def test_generated_requests_never_break_the_server(target: FuzzTarget,
                                                    generated: tuple[str, pb.CreditControlRequest]
                                                    ) -> None:
    method, request = generated
    before = _balances(target)
    try:
        answer = getattr(target.charging, method)(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED_STATUSES, (error.code(), error.details())
        assert _balances(target) == before
        return
    if answer.result_code == pb.UNABLE_TO_COMPLY:
        # "store unavailable: retry" is the answer to a Redis that did not answer in time;
        # the retransmission (same request number) must then be answered: a bad input
        # that broke the charging script would fail again
        answer = getattr(target.charging, method)(request, timeout=30)
        assert answer.result_code != pb.UNABLE_TO_COMPLY, (answer.error_message,
                                                           _server_log_tail())
    if answer.result_code in REFUSALS and not answer.rating_groups:
        assert _balances(target) == before, answer  # refused: nothing charged or reserved
    for item in answer.rating_groups:
        assert item.charged_micros >= 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2_000), st.sampled_from(
    ["/creditline.v1.Charging/Initial", "/creditline.v1.Charging/Event",
     "/creditline.v1.Admin/TopUp"]))
def test_raw_malformed_bytes_get_a_clear_status(target: FuzzTarget, raw: bytes,
                                                method: str) -> None:
    call = target.channel.unary_unary(method)  # bytes in, bytes out
    try:
        call(raw, timeout=30)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            error.code(), error.details())


def test_books_reconcile_after_the_garbage(target: FuzzTarget, tmp_path: Path) -> None:
    redis = Redis.from_url(target.redis.url)
    sink = open_sink(f"sqlite:///{tmp_path / 'cdrs.db'}")
    try:
        partitions = int(redis.hget("cl:meta", "partitions") or 0)
        Exporter(redis, partitions, sink).drain()
        checked, problems = reconcile(redis, partitions, sink)
    finally:
        sink.close()
        redis.close()
    assert checked >= len(ACCOUNTS) and problems == []


def test_calls_past_the_limit_get_resource_exhausted(target: FuzzTarget) -> None:
    port = free_port()
    server = _serve(target.redis.url, port, "--max-concurrent-calls", "3")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            notifications = notifications_pb2_grpc.NotificationsStub(channel)
            streams = [notifications.Subscribe(npb.SubscribeRequest(account_ids=[ACCOUNTS[0]]))
                       for _ in range(3)]
            for stream in streams:
                stream.initial_metadata()  # live: each holds one of the three places
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as refused:
                admin_pb2_grpc.AdminStub(channel).GetAccount(
                    admin_pb.GetAccountRequest(account_id=ACCOUNTS[0]), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in streams:
                stream.cancel()
    finally:
        server.terminate()
        server.wait(30)
