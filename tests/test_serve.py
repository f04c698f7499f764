"""`creditline serve` as a user runs it: no Redis given, so it starts its own, private; a
first session; SIGTERM stops it cleanly and the embedded redis-server with it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis import Redis as SyncRedis

from tests.messages import RG_VOICE, block, ccr, granted
from tests.processes import serve, stop, wait_for_port


def _show_account_into_a_closed_pipe(port: int, account_id: str) -> None:
    # `creditline account show ... | head`: the reader has gone before the command writes
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "creditline", "account", "--server", f"127.0.0.1:{port}",
             "show", account_id],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert finished.returncode == 141, finished.stderr  # the shell's code for a broken pipe
    assert finished.stderr == ""  # no traceback


def _serve_with_embedded_redis(port: int) -> subprocess.Popen[str]:
    """`creditline serve` as a user runs it: no Redis settings, so it starts its own."""
    return serve("--listen-address", f"127.0.0.1:{port}", "--workers", "1")


def test_serve_with_embedded_redis_then_sigterm() -> None:
    port = free_port()
    process = _serve_with_embedded_redis(port)
    try:
        wait_for_port(port, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            charging = charging_pb2_grpc.ChargingStub(channel)
            admin.CreateAccount(admin_pb.CreateAccountRequest(
                account_id="alice", initial_balance_micros=5_000_000))
            answer = charging.Initial(ccr("call-1", "alice", 0, block(RG_VOICE, requested=60)))
            assert answer.result_code == pb.SUCCESS and granted(answer, RG_VOICE) == 60
            charging.Terminate(ccr("call-1", "alice", 1, block(RG_VOICE, used=42)))
            state = admin.GetAccount(admin_pb.GetAccountRequest(account_id="alice"))
            assert state.balance_micros == 5_000_000 - 700_000  # connect + first minute
        _show_account_into_a_closed_pipe(port, "alice")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        socket_path = _socket_of(_embedded_redis_url(output))
        assert not _accepts(socket_path)
        assert not Path(socket_path).parent.exists()  # its private directory went with it
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_serve_refuses_a_bad_plan_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = tmp_path / "plan.toml"
    plan.write_text("[[tariff]]\nrating_group = 1\nunit = 'furlongs'\n")
    result = subprocess.run(
        [sys.executable, "-m", "creditline", "serve", "--plan-path", str(plan)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "tariff[0].unit" in result.stderr and str(plan) in result.stderr


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_workers_share_the_port_and_all_stop_on_sigterm() -> None:
    port = free_port()
    process = serve("--listen-address", f"127.0.0.1:{port}", "--workers", "2")
    try:
        wait_for_port(port, process)
        time.sleep(1)  # both workers have bound the port by now
        for n in range(20):  # new connections: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = admin_pb2_grpc.AdminStub(channel)
                account = admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=f"w{n}", initial_balance_micros=n))
                assert account.balance_micros == n
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        pids = {line.split("(pid ")[1].split(")")[0] for line in output.splitlines()
                if "listening on port" in line}
        assert len(pids) == 2, output
        assert not _children(process.pid)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_the_embedded_redis_ends_with_a_killed_server() -> None:
    # kill -9 gives the server no chance to stop its redis-server: the kernel does (Linux)
    port = free_port()
    process = _serve_with_embedded_redis(port)
    try:
        assert process.stdout is not None
        socket_path = _socket_of(_embedded_redis_url(_started_line(process)))
        wait_for_port(port, process)
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _accepts(socket_path):
            assert time.monotonic() < deadline, "redis-server outlived its killed server"
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _accepts(socket_path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(socket_path)
            return True
        except OSError:
            return False


def _started_line(process: subprocess.Popen[str]) -> str:
    """The server's log line that names its embedded Redis (read as the server starts)."""
    assert process.stdout is not None
    line = ""
    while "started embedded redis-server" not in line:
        line = process.stdout.readline()
        assert line, "the server ended before it started its redis-server"
    return line


def _embedded_redis_url(output: str) -> str:
    found = re.search(r"started embedded redis-server \S+ on (\S+)", output)
    assert found, output
    return found.group(1)


def _socket_of(url: str) -> str:
    assert url.startswith("unix://"), url
    return url.removeprefix("unix://").split("?")[0]


def _tcp_listening(pid: int) -> list[str]:
    """The local addresses (hex, as /proc/net says them) process `pid` listens on by TCP."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target.removeprefix("socket:[").rstrip("]"))
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                listening.append(fields[1])
    return listening


def _other_user_connects(socket_path: str) -> bool | None:
    """Whether user nobody may connect to the socket; None when this test cannot switch
    users (not root, or no interpreter nobody may run)."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not Path(python).exists() or not shutil.which("setpriv"):
        return None
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); "
             "sys.exit(0 if s.connect_ex(sys.argv[1]) == 0 else 3)")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", probe,
         socket_path], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode in (0, 3), result.stderr
    return result.returncode == 0


def test_the_embedded_redis_is_private(redis_process: RedisProcess, tmp_path: Path) -> None:
    """The embedded Redis has no password: it listens on a unix socket in a directory only
    its user may enter, and on no TCP port. The offline commands reach it by its URL."""
    port = free_port()
    process = _serve_with_embedded_redis(port)
    try:
        url = _embedded_redis_url(_started_line(process))
        socket_path = _socket_of(url)
        wait_for_port(port, process)
        directory = Path(socket_path).parent.stat()
        assert directory.st_mode & 0o777 == 0o700
        assert directory.st_uid == os.geteuid()
        (redis_pid,) = [pid for pid in _children(process.pid)
                        if Path(f"/proc/{pid}/comm").read_text().strip() == "redis-server"]
        assert _tcp_listening(redis_pid) == []
        assert redis_process.pid is not None and _tcp_listening(redis_process.pid)  # sees one
        assert _other_user_connects(socket_path) in (False, None)
        with SyncRedis.from_url(url) as client:
            assert client.config_get("port") == {"port": "0"}
        books = subprocess.run(
            [sys.executable, "-m", "creditline", "reconcile", "--redis-url", url,
             "--sink", f"sqlite:///{tmp_path / 'cdrs.sqlite'}"],
            capture_output=True, text=True, timeout=60, check=False)
        assert books.returncode == 0, books.stdout + books.stderr
        assert "0 discrepancies" in books.stderr
    finally:
        stop(process)
