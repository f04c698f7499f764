"""Safe as shipped: without mutual TLS every caller has every role, so the server listens
off loopback only with mutual TLS (or when told to, loudly); a password in the Redis URL
is warned about, and `--help` says where secrets belong."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from creditline.settings import Settings, is_loopback
from creditline.store.redis_process import RedisProcess, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis as SyncRedis

from tests.processes import serve, stop, wait_for_port

REMOTE = ("0.0.0.0:50051", "[::]:50051", "192.0.2.7:50051", "db.example:50051", ":50051")
LOCAL = ("127.0.0.1:50051", "127.0.0.2:1", "[::1]:50051", "localhost:50051",
         "unix:/tmp/creditline.sock")


def test_listening_off_loopback_needs_mutual_tls() -> None:
    mutual_tls = {"tls_cert_file": "s.crt", "tls_key_file": "s.key",
                  "tls_client_ca_file": "ca.crt"}
    for address in REMOTE:
        assert not is_loopback(address), address
        with pytest.raises(ValueError, match="allow_insecure_remote") as refused:
            Settings(listen_address=address)
        assert f"setting listen_address: {address}" in str(refused.value)
        # TLS without client certificates: encrypted, but every caller still has every role
        with pytest.raises(ValueError, match="without mutual TLS"):
            Settings(listen_address=address, tls_cert_file="s.crt", tls_key_file="s.key")
        assert Settings(listen_address=address, **mutual_tls).listen_address == address
        assert Settings(listen_address=address, allow_insecure_remote=True).allow_insecure_remote
    for address in LOCAL:
        assert is_loopback(address), address
        assert Settings(listen_address=address).listen_address == address


def test_serve_refuses_plaintext_off_loopback_unless_told_and_then_warns(
        redis_process: RedisProcess) -> None:
    port = free_port()
    refused = subprocess.run(
        [sys.executable, "-m", "creditline", "serve", "--listen-address", f"0.0.0.0:{port}",
         "--redis-url", redis_process.url], capture_output=True, text=True, timeout=60,
        check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "every caller has every role" in refused.stderr
    assert "allow_insecure_remote" in refused.stderr
    process = serve("--listen-address", f"0.0.0.0:{port}", "--allow-insecure-remote", "true",
                    "--redis-url", redis_process.url, "--workers", "1")
    try:
        wait_for_port(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        output = stop(process)
    assert process.returncode == 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert any(f"0.0.0.0:{port} without mutual TLS" in line for line in warnings), output


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[tuple[RedisProcess, str]]:
    password = uuid.uuid4().hex
    with RedisProcess() as process:
        with SyncRedis.from_url(process.url) as client:
            client.config_set("requirepass", password)
        yield process, password


def test_a_password_in_the_redis_url_is_warned_about_and_never_shown(
        redis_with_password: tuple[RedisProcess, str], tmp_path: Path) -> None:
    process, password = redis_with_password
    port = free_port()
    url = process.url.replace("redis://", f"redis://default:{password}@")
    server = serve("--listen-address", f"127.0.0.1:{port}", "--redis-url", url,
                   "--workers", "1")
    try:
        wait_for_port(port, server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING  # it does work
    finally:
        output = stop(server)
    assert server.returncode == 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert any("redis_url carries a password" in line and "CREDITLINE_REDIS_PASSWORD" in line
               and "redis_password_file" in line for line in warnings), output
    assert password not in output
    # the offline commands take it from the environment too
    books = subprocess.run(
        [sys.executable, "-m", "creditline", "reconcile", "--redis-url", process.url,
         "--sink", f"sqlite:///{tmp_path / 'cdrs.sqlite'}"],
        env={**os.environ, "CREDITLINE_REDIS_PASSWORD": password}, capture_output=True,
        text=True, timeout=60, check=False)
    assert books.returncode == 0 and "0 discrepancies" in books.stderr, books.stderr


def test_serve_help_says_where_secrets_belong() -> None:
    shown = subprocess.run([sys.executable, "-m", "creditline", "serve", "--help"],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    words = " ".join(shown.split())  # argparse wraps lines
    about_url = words.split("--redis-url REDIS_URL ")[1].split(" --")[0]
    assert "CREDITLINE_REDIS_PASSWORD" in about_url and "redis-password-file" in about_url
    assert "--redis-password " not in words  # a secret has no flag
