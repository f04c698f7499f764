"""`creditline serve` as a child process, run as a user runs it (flags, no CREDITLINE_ or
OTEL_ variables of the test run's own): for the tests of the command itself, its logs,
exit codes and the embedded Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30


def serve(*flags: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITLINE_", "OTEL_"))}
    return subprocess.Popen([sys.executable, "-m", "creditline", "serve", *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                continue
    pytest.fail("server did not start")


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, and the server's whole output once it has ended (killed if it hangs)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output
