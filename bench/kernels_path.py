"""What the compiled request path saves: the server's CPU per request on its pure-Python
twin against on the compiled kernels (issue 16's goal: pure / compiled >= 1.3).

    python -m bench.kernels_path [--duration-s 10] [--rounds 3] [--concurrency 64]
                                 [--accounts 2000] [--kernel-calls 20000] [--path-only]

Starts two `creditline serve` processes (one worker each, as bench/run.py does), each on
a redis-server of its own: one on the compiled kernels, one with CREDITLINE_PURE_RATING=1
on the twin; then drives both with bench/driver.py's closed loop (bench/workload.py's
mix: sessions of Initial, 3 Updates and Terminate, and DIRECT_DEBIT events), one after
the other in each round, the order turned round every round so the machine's other load
hits both alike. Per run: requests/s and the server process's CPU (user + system) per
answered request, warm-up and drain included on both sides of the division. The ratio
of the medians is the figure.

Then the kernels alone: the request path's own work per request (the checks of an Update,
its block's script arguments and its answer written from a script answer of one rating
group), timed in this process on each implementation (alone with --path-only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from creditline.api.messages import RequestPath
from creditline.charging.kernels import PURE_ENV, Kernels, compiled_kernels, pure_kernels
from creditline.charging.rating import BandedRater, load_plan
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.contract import RequestKind
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import charging_pb2 as pb

from bench.driver import CLOSED_LOOP, DriverConfig, run_processes
from bench.notify_bench import create_accounts
from bench.run import ServerProcess
from bench.workload import Workload

MODES = ("compiled", "pure")
# a script answer of one volume rating group, as the charging script writes it
SCRIPT_ANSWER = "2001;10,2001,v,1048576,2000,0,0"


@contextlib.contextmanager
def _server(mode: str, log_dir: Path) -> Iterator[ServerProcess]:
    with RedisProcess() as redis_process:
        port = free_port()
        environ = dict(os.environ)
        environ.pop(PURE_ENV, None)
        if mode == "pure":
            environ[PURE_ENV] = "1"
        server = ServerProcess(mode, [
            sys.executable, "-m", "creditline", "serve", "--redis-url", redis_process.url,
            "--listen-address", f"127.0.0.1:{port}", "--log-level", "INFO",
            "--workers", "1"], port, log_dir, env=environ)
        try:
            yield server
        finally:
            server.stop()


def _cpu_s(server: ServerProcess) -> float:
    total = 0.0
    for process in server.processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = process.cpu_times()
            total += cpu.user + cpu.system
    return total


def _measure(server: ServerProcess, args: argparse.Namespace, workload: Workload,
             run_tag: str) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per answered request) of one closed-loop run."""
    config = DriverConfig(target=server.target, mode=CLOSED_LOOP, duration_s=args.duration_s,
                          warmup_s=1.0, concurrency=args.concurrency, run_tag=run_tag,
                          workload=workload)
    before_s = _cpu_s(server)
    result = run_processes(config)
    cpu_s = _cpu_s(server) - before_s
    if result.errors:
        raise RuntimeError(f"{server.name}: failed calls {result.errors}")
    return result.requests / result.duration_s, cpu_s / result.requests_total * 1e6


def _kernels_alone_us(kernels: Kernels, calls: int) -> float:
    """The request path's work of one Update (checks, the blocks' script arguments, answer
    bytes), in microseconds."""
    plan = load_plan(Path(DEFAULT_PLAN_PATH))
    path = RequestPath(kernels, plan, BandedRater(), Settings())
    request = pb.CreditControlRequest(
        session_id="bench-session-000001", account_id="bench-000042", request_number=2,
        rating_groups=[pb.RatingGroupRequest(
            rating_group=10, requested=pb.Units(total_octets=1_048_576),
            used=pb.Units(total_octets=1_000_000), reporting_reason=pb.THRESHOLD)])
    now_ms = int(time.time() * 1000)
    best_s = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            path.check_credit_control(request, RequestKind.UPDATE, now_ms)
            path.script_blocks(request.rating_groups, now_ms, default_grant=True)
            path.credit_control_answer(SCRIPT_ANSWER, request, now_ms)
        best_s = min(best_s, time.perf_counter() - started)
    return best_s / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--kernel-calls", type=int, default=20_000)
    parser.add_argument("--path-only", action="store_true",
                        help="only the request path alone, in this process: no servers")
    args = parser.parse_args()
    if not args.path_only:
        _servers_ratio(args)
    alone = {k.implementation: _kernels_alone_us(k, args.kernel_calls)
             for k in (compiled_kernels(), pure_kernels())}
    print(f"the request path alone (an Update's checks, blocks and answer): compiled "
          f"{alone['compiled']:.2f} us, pure {alone['pure']:.2f} us, "
          f"ratio {alone['pure'] / alone['compiled']:.1f}")
    return 0


def _servers_ratio(args: argparse.Namespace) -> None:
    """Both servers driven in alternation; prints each run, the medians and their ratio."""
    workload = Workload(account_count=args.accounts)
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp, \
            _server("compiled", Path(tmp)) as compiled, _server("pure", Path(tmp)) as pure:
        servers = {"compiled": compiled, "pure": pure}
        for server in servers.values():
            asyncio.run(server.wait_ready())
            asyncio.run(create_accounts(server.target, workload.all_accounts()))
        for round_number in range(args.rounds):
            order = MODES if round_number % 2 == 0 else MODES[::-1]
            for mode in order:
                rps, cpu_us = _measure(servers[mode], args, workload, f"r{round_number}")
                runs[mode].append((rps, cpu_us))
                print(f"round {round_number} {mode:8s} {rps:8.0f} requests/s "
                      f"{cpu_us:7.1f} us server CPU per request", flush=True)
        for mode, server in servers.items():
            served = [line for line in server.log_tail().splitlines() if "rating kernels" in line]
            print(f"{mode} server log: {served[-1].strip() if served else '(no line)'}")
    medians = {mode: (statistics.median(r for r, _ in found),
                      statistics.median(c for _, c in found)) for mode, found in runs.items()}
    for mode, (rps, cpu_us) in medians.items():
        print(f"median {mode:8s} {rps:8.0f} requests/s {cpu_us:7.1f} us server CPU per request")
    print(f"server CPU per request, pure / compiled: "
          f"{medians['pure'][1] / medians['compiled'][1]:.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
