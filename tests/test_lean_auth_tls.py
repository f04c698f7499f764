"""The lean EVALSHA path (fastredis) with AUTH and TLS, against real redis-servers: one
with a password and an ACL user, one with TLS, client certificates and a password. The
server's charging goes through the lean connection (found by its client id: its user, db,
port and last command in CLIENT LIST), a session across a killed lean connection charges
and the books balance (the connection comes back authenticated), and a wrong password is
refused without being shown."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, start_server, stop_server
from creditline.settings import Settings
from creditline.store.fastredis import FastScriptClient, tls_context
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError

from tests.books import Books
from tests.conftest import settings_with
from tests.messages import RG_VOICE, RG_WEB, block, ccr
from tests.test_security import CertificateAuthority, start_tls_redis

USER = "app"
DB = 3  # not 0: the lean connection must SELECT it after AUTH
# after CLIENT KILL: time for the lean connection to see its end before the next call
KILL_SETTLE_S = 0.2


@dataclass
class SecuredRedis:
    url: str
    settings: Settings  # the server's: credentials (and TLS files) for url
    admin: Redis  # on the plain port, as the default user
    tls_port: int = 0


def _acl_user(password: str) -> list[str]:
    return ["ACL", "SETUSER", USER, "on", f">{password}", "~*", "&*", "+@all"]


async def _admin_with_password(process: RedisProcess, password: str) -> Redis:
    """Sets the default user's password; a client of the plain port that gives it."""
    first = Redis.from_url(process.url)
    await first.config_set("requirepass", password)
    await first.aclose()
    return Redis.from_url(process.url.replace("/0", f"/{DB}"), password=password,
                          decode_responses=True)


@pytest.fixture(scope="module")
async def acl_redis(settings: Settings) -> AsyncIterator[SecuredRedis]:
    """A Redis with a password for the default user and an ACL user of its own."""
    user_password = uuid.uuid4().hex
    with RedisProcess() as process:
        admin = await _admin_with_password(process, uuid.uuid4().hex)
        await admin.execute_command(*_acl_user(user_password))
        url = process.url.replace("/0", f"/{DB}")
        yield SecuredRedis(url, settings_with(
            settings, redis_url=url, redis_username=USER, redis_password=user_password),
            admin)
        await admin.aclose()


@pytest.fixture(scope="module")
async def tls_redis(settings: Settings, tmp_path_factory: pytest.TempPathFactory
                    ) -> AsyncIterator[SecuredRedis]:
    """A Redis on TLS that asks for client certificates, and a password."""
    ca = CertificateAuthority(tmp_path_factory.mktemp("redis-pki"))
    client = ca.issue("creditline-redis-client")
    password, tls_port = uuid.uuid4().hex, free_port()
    process = start_tls_redis(ca, tls_port)
    try:
        admin = await _admin_with_password(process, password)
        url = f"rediss://127.0.0.1:{tls_port}/{DB}"
        yield SecuredRedis(url, settings_with(
            settings, redis_url=url, redis_password=password,
            redis_tls_ca_file=str(ca.path), redis_tls_cert_file=str(client.cert_path),
            redis_tls_key_file=str(client.key_path)), admin, tls_port)
        await admin.aclose()
    finally:
        process.stop()


@pytest.fixture(params=["acl_redis", "tls_redis"])
def secured(request: pytest.FixtureRequest) -> SecuredRedis:
    redis: SecuredRedis = request.getfixturevalue(request.param)
    return redis


async def _lean_id(running: RunningServer) -> int:
    """The client id of the server's lean connection (asked through it)."""
    assert running.transport.bounded, "charging is not on the lean path"
    client_id: int = await running.transport.command("", "CLIENT", "ID")
    return client_id


async def _client(admin: Redis, client_id: int) -> dict[str, Any]:
    """CLIENT LIST's line of one connection."""
    found: list[dict[str, Any]] = await admin.client_list(client_id=[client_id])
    assert len(found) == 1, found
    return found[0]


async def _charge_calls(admin: Redis, operation: str) -> int:
    """The calls of the charging script's operation (FCALL, or EVALSHA on Redis 6.2)."""
    stats: dict[str, dict[str, int]] = await admin.info("commandstats")
    return stats.get(f"cmdstat_{operation}", {}).get("calls", 0)


async def _new_account(channel: grpc.aio.Channel, books: Books) -> str:
    account_id = f"lean-{uuid.uuid4().hex[:8]}"
    await admin_pb2_grpc.AdminStub(channel).CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=50_000_000))
    books.track(account_id)
    return account_id


async def _session_across_a_kill(running: RunningServer, secured: SecuredRedis) -> None:
    """Initial, the lean connection killed, Update and Terminate: every answer SUCCESS,
    the charging calls on the (new) lean connection, and the books balanced."""
    books = Books(secured.admin, running.store.config.partitions)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        charging = charging_pb2_grpc.ChargingStub(channel)
        account_id = await _new_account(channel, books)
        sid = f"{account_id};s1"
        operation = running.store.charge_operation.lower()
        calls_before = await _charge_calls(secured.admin, operation)
        lean_id = await _lean_id(running)
        answer = await charging.Initial(ccr(sid, account_id, 0, block(RG_WEB, requested=10_240),
                                            block(RG_VOICE, requested=300)))
        assert answer.result_code == pb.SUCCESS
        killed = await _client(secured.admin, lean_id)
        assert killed["cmd"] == operation  # the Initial's, on the lean connection
        await secured.admin.client_kill_filter(_id=killed["id"])
        await asyncio.sleep(KILL_SETTLE_S)
        answers = [await charging.Update(ccr(sid, account_id, 1, block(RG_WEB, used=5_000),
                                             block(RG_VOICE, used=90))),
                   await charging.Terminate(ccr(sid, account_id, 2, block(RG_WEB, used=3_000),
                                                block(RG_VOICE, used=30)))]
        assert [a.result_code for a in answers] == [pb.SUCCESS, pb.SUCCESS]
        assert await _charge_calls(secured.admin, operation) - calls_before >= 3
        # a new connection (opened by the Update's call), as the same user on the db
        again = await _client(secured.admin, await _lean_id(running))
        assert again["id"] != killed["id"]
        for connection in (killed, again):
            assert (connection["user"], connection["db"]) == (
                secured.settings.redis_username or "default", str(DB))
        await books.assert_balanced()


async def test_a_session_charges_on_the_lean_path_across_a_killed_connection(
        secured: SecuredRedis) -> None:
    running = await start_server(secured.settings, secured.url, environ={})
    try:
        lean = await _client(secured.admin, await _lean_id(running))
        if secured.tls_port:  # on the TLS port, not the plain one beside it
            assert lean["laddr"].endswith(f":{secured.tls_port}")
        await _session_across_a_kill(running, secured)
    finally:
        await stop_server(running, grace_s=1.0)


async def test_a_wrong_password_is_refused_without_showing_it(acl_redis: SecuredRedis) -> None:
    wrong = "wrong-" + uuid.uuid4().hex
    client = FastScriptClient(acl_redis.url, 2.0, 2.0, username=USER, password=wrong)
    try:
        for _ in range(2):  # each call tries a new connection, refused again
            with pytest.raises(AuthenticationError, match=r"refused AUTH.*WRONGPASS") as refused:
                await client.evalsha("0" * 40, "return 1", [], [])
            assert wrong not in str(refused.value) and wrong not in repr(refused.value)
    finally:
        await client.aclose()


async def test_a_server_whose_password_redis_no_longer_takes_answers_unable_to_comply(
        acl_redis: SecuredRedis, caplog: pytest.LogCaptureFixture) -> None:
    """The user's password changed under a running server, its lean connection ended:
    every charge gets 5012 (nothing logged shows the password); with the password back the
    next charge reconnects and succeeds."""
    running = await start_server(acl_redis.settings, acl_redis.url, environ={})
    password = acl_redis.settings.redis_password
    books = Books(acl_redis.admin, running.store.config.partitions)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)
            account_id = await _new_account(channel, books)
            lean = await _client(acl_redis.admin, await _lean_id(running))
            await acl_redis.admin.execute_command(
                "ACL", "SETUSER", USER, "resetpass", f">{uuid.uuid4().hex}")
            try:
                await acl_redis.admin.client_kill_filter(_id=lean["id"])
                await asyncio.sleep(KILL_SETTLE_S)
                with caplog.at_level(logging.DEBUG):
                    refused = await charging.Initial(ccr(f"{account_id};s1", account_id, 0,
                                                         block(RG_VOICE, requested=60)))
            finally:  # the password back, for this test and the module's others
                await acl_redis.admin.execute_command(*_acl_user(password))
            assert refused.result_code == pb.UNABLE_TO_COMPLY
            # (service.py logs the error's repr: redis-py's names its kind, not its text)
            assert "AuthenticationError" in caplog.text and password not in caplog.text
            assert password not in refused.error_message
            answer = await charging.Initial(ccr(f"{account_id};s2", account_id, 0,
                                                block(RG_VOICE, requested=60)))
            assert answer.result_code == pb.SUCCESS
        await books.assert_balanced()
    finally:
        await stop_server(running, grace_s=1.0)


async def test_a_tls_server_the_ca_does_not_vouch_for_is_refused(
        tls_redis: SecuredRedis, tmp_path: Path) -> None:
    stranger = CertificateAuthority(tmp_path, "another CA")
    client = FastScriptClient(tls_redis.url, 2.0, 2.0, tls=tls_context(str(stranger.path)))
    try:
        with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.call("PING")
    finally:
        await client.aclose()
