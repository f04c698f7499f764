"""Charge notifications (issue 4): latency from a charge to its event at a subscriber, and
what 100 subscribers cost the charging throughput.

    python -m bench.notify_bench --rate 200 --latency-s 20 --duration-s 15 --rounds 2

Starts a redis-server and `creditline serve --workers 1` (each its own process, loopback),
creates the accounts through the Admin API, then:

 1. latency: one subscriber (Notifications.Subscribe, filtered to --latency-accounts
    accounts and to EVENT_CHARGED) while Event DIRECT_DEBIT requests are sent at a fixed
    --rate (open loop, requests due at fixed intervals, round robin over those accounts)
    for --latency-s. Latency = when the event reached the subscriber minus when the
    request whose session_id the event carries was sent (time.perf_counter, one process).
    The Event answer's latency is reported beside it. Goal: p99 <= 10 ms.
 2. throughput: the closed-loop driver of bench/run.py (bench/driver.py, same workload),
    alternately with no subscriber and with --subscribers subscribers attached and reading
    (none, N, none, N, ... for --rounds rounds). Subscriber i is filtered to account i of
    the workload plus one of its hot accounts (--filter mix, the default), or to account i
    only (--filter own). With --batches the subscribers use Notifications.SubscribeBatches
    (every queued event in one message) instead of Subscribe, and --batch-linger-s sets
    the server's subscriber_batch_linger_s (how long a batch waits for more events; the
    server's default otherwise). Goal: req/s with N / req/s
    with none >= 0.9. Server CPU per request is reported for each round too (steadier than
    req/s on a shared machine).

Writes bench/results/notify-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from creditline.settings import MAX_BATCH_LINGER_S
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio import Redis

from bench.driver import CLOSED_LOOP, PROCESS_START_ALLOWANCE_S, DriverConfig, run_processes
from bench.redis_stats import command_calls
from bench.run import ServerProcess, bounded, redis_server_ps
from bench.workload import Workload, event_request

log = logging.getLogger("bench.notify")
ROOT = Path(__file__).resolve().parent.parent
clock = time.perf_counter
GOAL_P99_MS = 10.0
GOAL_RATIO = 0.9
ACCOUNT_CREATION_CONCURRENCY = 64
LATENCY_ACCOUNT_BALANCE_MICROS = 10_000_000_000_000
# after the last request: how long the subscriber may still take to receive its events
EVENT_GRACE_S = 3.0
CALL_TIMEOUT_S = 5.0
SUBSCRIBE_TIMEOUT_S = 10.0
MAX_RATE = 5_000.0
SLOW_EVENT_S = GOAL_P99_MS / 1000
MAX_SLOW_LISTED = 500
MAX_SECONDS = 3_600.0


def percentiles_ms(samples_s: list[float]) -> dict[str, float | int]:
    if not samples_s:
        return {"count": 0}
    ordered = sorted(samples_s)

    def at(percent: float) -> float:
        index = min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))
        return round(ordered[index] * 1000, 3)

    return {"count": len(ordered), "p50_ms": at(50), "p90_ms": at(90), "p99_ms": at(99),
            "max_ms": round(ordered[-1] * 1000, 3),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 3)}


async def create_accounts(target: str, accounts: list[tuple[str, int]]) -> None:
    limit = asyncio.Semaphore(ACCOUNT_CREATION_CONCURRENCY)
    async with grpc.aio.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)

        async def create(account_id: str, balance_micros: int) -> None:
            async with limit:
                await admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=account_id, initial_balance_micros=balance_micros),
                    timeout=10.0)

        await asyncio.gather(*(create(a, b) for a, b in accounts))


async def subscribe(notifications: notifications_pb2_grpc.NotificationsStub,
                    request: npb.SubscribeRequest, batches: bool = False) -> Any:
    """A subscription (SubscribeBatches if asked), once live (its start cursor arrived)."""
    call = (notifications.SubscribeBatches if batches else notifications.Subscribe)(request)
    await asyncio.wait_for(call.initial_metadata(), SUBSCRIBE_TIMEOUT_S)
    return call


async def latency_phase(target: str, accounts: list[str], rate: float, duration_s: float,
                        warmup_s: float, tag: str) -> dict[str, Any]:
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    answered: dict[str, float] = {}
    codes: dict[int, int] = {}
    errors: dict[str, int] = {}
    duplicates = 0
    # subscriber and charging client on separate connections, like separate systems
    async with grpc.aio.insecure_channel(target) as sub_channel, \
            grpc.aio.insecure_channel(target) as charge_channel:
        call = await subscribe(notifications_pb2_grpc.NotificationsStub(sub_channel),
                               npb.SubscribeRequest(account_ids=accounts,
                                                    event_types=[npb.EVENT_CHARGED]))

        async def read() -> None:
            nonlocal duplicates
            async for event in call:
                now = clock()
                if event.session_id in received:
                    duplicates += 1
                received.setdefault(event.session_id, now)

        reader = asyncio.create_task(read())
        charging = charging_pb2_grpc.ChargingStub(charge_channel)

        async def send(sid: str, account: str) -> None:
            request = event_request(sid, account)
            sent[sid] = clock()
            try:
                answer = await charging.Event(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] = errors.get(error.code().name, 0) + 1
                return
            answered[sid] = clock()
            codes[answer.result_code] = codes.get(answer.result_code, 0) + 1

        total = int((warmup_s + duration_s) * rate)
        warmup_count = int(warmup_s * rate)
        tasks = set()
        start = clock() + 0.1
        late_s: list[float] = []
        for n in range(total):
            due = start + n / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            late_s.append(clock() - due)
            task = asyncio.create_task(send(f"notify.bench;{tag};{n}", accounts[n % len(accounts)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        deadline = clock() + EVENT_GRACE_S
        while len(received) < len(answered) and clock() < deadline:
            await asyncio.sleep(0.05)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader
    measured = [f"notify.bench;{tag};{n}" for n in range(warmup_count, total)]
    to_event = [received[s] - sent[s] for s in measured if s in received]
    to_answer = [answered[s] - sent[s] for s in measured if s in answered]
    # the event can reach the subscriber before the answer reaches the client
    event_after_answer = [received[s] - answered[s] for s in measured
                          if s in received and s in answered]
    missing = sum(1 for s in measured if s in answered and s not in received)
    result: dict[str, Any] = {
        "rate_rps": rate, "duration_s": duration_s, "warmup_s": warmup_s,
        "accounts": len(accounts), "requests_measured": len(measured),
        "result_codes": {str(k): v for k, v in codes.items()}, "errors": errors,
        "events_missing": missing, "events_duplicated": duplicates,
        "send_to_event": percentiles_ms(to_event),
        "send_to_answer": percentiles_ms(to_answer),
        "answer_to_event": percentiles_ms(event_after_answer),
        "sender_late": percentiles_ms(late_s[warmup_count:]),
        # when the slow ones were sent (s after the first request) and their latency (ms):
        # to tell periodic stalls from random ones
        "slow_events": [[round(sent[s] - start, 3), round((received[s] - sent[s]) * 1000, 2)]
                        for s in measured if s in received
                        and received[s] - sent[s] > SLOW_EVENT_S][:MAX_SLOW_LISTED],
    }
    p99 = result["send_to_event"].get("p99_ms")
    result["goal_p99_le_10ms"] = p99 is not None and p99 <= GOAL_P99_MS and missing == 0
    return result


def _cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = process.cpu_times()
            total += cpu.user + cpu.system
    return total


class Subscribers:
    """N subscriptions on their own channel, each read by a task that counts events."""

    def __init__(self, target: str, filters: list[list[str]], batches: bool = False) -> None:
        self.target = target
        self.filters = filters
        self.batches = batches
        self.events = 0
        self.ended: dict[str, int] = {}
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Subscribers:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = notifications_pb2_grpc.NotificationsStub(self._channel)
        self._calls = await asyncio.gather(*(
            subscribe(stub, npb.SubscribeRequest(account_ids=accounts), self.batches)
            for accounts in self.filters))
        self._tasks = [asyncio.create_task(self._read(call)) for call in self._calls]
        return self

    async def _read(self, call: Any) -> None:
        try:
            async for message in call:
                self.events += len(message.events) if self.batches else 1
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.ended[error.code().name] = self.ended.get(error.code().name, 0) + 1

    async def __aexit__(self, *exc: object) -> None:
        for call in self._calls:
            call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(None)


@dataclass(frozen=True)
class RedisProbe:
    """Our redis-server: its CPU, and its count of the hub's reads (XREAD)."""

    client: Redis
    process: psutil.Process

    async def reading(self) -> tuple[float, int]:
        calls = await command_calls(self.client)
        return _cpu_s([self.process]), calls.get("xread", 0)


async def throughput_round(config: DriverConfig, server: ServerProcess,
                           subscribers: Subscribers | None, redis: RedisProbe
                           ) -> dict[str, Any]:
    start_at = time.time() + PROCESS_START_ALLOWANCE_S
    cpu_before = _cpu_s(server.processes())
    redis_cpu_before, reads_before = await redis.reading()
    events_before = subscribers.events if subscribers else 0
    wall = clock()
    result = await asyncio.to_thread(run_processes, config, start_at)
    wall = clock() - wall
    cpu_used = _cpu_s(server.processes()) - cpu_before
    redis_cpu_after, reads_after = await redis.reading()
    per_request = 1 / result.requests_total if result.requests_total else 0.0
    events = (subscribers.events - events_before) if subscribers else 0
    latency = result.overall().summary()
    return {
        "subscribers": len(subscribers.filters) if subscribers else 0,
        "throughput_rps": round(result.throughput_rps, 1),
        "requests_measured": result.requests, "requests_total": result.requests_total,
        "errors": dict(result.errors), "success": result.success_count(),
        "p50_ms": latency.get("p50_ms"), "p99_ms": latency.get("p99_ms"),
        # over the whole phase (warm-up and drain too), like requests_total
        "server_cpu_ms_per_request": round(1000 * cpu_used / result.requests_total, 4)
        if result.requests_total else None,
        # Redis's work for the same requests, and how often the hub read the streams
        "redis_cpu_ms_per_request": round(
            1000 * (redis_cpu_after - redis_cpu_before) * per_request, 4),
        "hub_reads_per_1000_requests": round(1000 * (reads_after - reads_before) * per_request, 1),
        "events_delivered": events, "events_delivered_per_s": round(events / wall, 1),
        "subscribers_ended": dict(subscribers.ended) if subscribers else {},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def subscriber_filters(workload: Workload, count: int, kind: str) -> list[list[str]]:
    filters = []
    for i in range(count):
        accounts = [workload.account_id(i % workload.account_count)]
        if kind == "mix" and workload.hot_account_count:
            accounts.append(workload.hot_account_id(i % workload.hot_account_count))
        filters.append(accounts)
    return filters


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workload = Workload(account_count=args.accounts, hot_account_count=args.hot_accounts)
    latency_accounts = [f"notify-lat-{n}" for n in range(args.latency_accounts)]
    with tempfile.TemporaryDirectory(prefix="creditline-notify-bench-") as tmp, \
            RedisProcess() as redis_process:
        port = free_port()
        linger = ([] if args.batch_linger_s is None
                  else ["--subscriber-batch-linger-s", str(args.batch_linger_s)])
        server = ServerProcess("creditline", [
            sys.executable, "-m", "creditline", "serve", "--workers", "1",
            "--redis-url", redis_process.url, "--listen-address", f"127.0.0.1:{port}",
            "--log-level", "WARNING", *linger], port, Path(tmp))
        try:
            await server.wait_ready()
            started = clock()
            await create_accounts(server.target, [
                *workload.all_accounts(),
                *((a, LATENCY_ACCOUNT_BALANCE_MICROS) for a in latency_accounts)])
            log.info("created %d accounts in %.1f s", workload.account_count +
                     workload.hot_account_count + len(latency_accounts), clock() - started)
            results: dict[str, Any] = {}
            if args.latency_s > 0:
                log.info("latency: %.0f Event/s for %.0f s on %d accounts, one subscriber "
                         "(load %s)", args.rate, args.latency_s, len(latency_accounts),
                         os.getloadavg())
                results["latency"] = await latency_phase(
                    server.target, latency_accounts, args.rate, args.latency_s,
                    args.warmup_s, args.tag)
                lat = results["latency"]
                log.info("  send -> event %s; send -> answer %s; missing %d",
                         lat["send_to_event"], lat["send_to_answer"], lat["events_missing"])
            if args.rounds > 0:
                async with Redis.from_url(redis_process.url) as client:
                    results["throughput"] = await throughput_phase(
                        args, workload, server,
                        RedisProbe(client, redis_server_ps(redis_process.port)))
        finally:
            code = server.stop()
            if code not in (0, -15):
                log.warning("server exited with %s: %s", code, server.log_tail())
    return results


async def throughput_phase(args: argparse.Namespace, workload: Workload,
                           server: ServerProcess, redis: RedisProbe) -> dict[str, Any]:
    filters = subscriber_filters(workload, args.subscribers, args.filter)
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        for with_subscribers in (False, True):
            config = DriverConfig(
                target=server.target, mode=CLOSED_LOOP, duration_s=args.duration_s,
                warmup_s=args.warmup_s, concurrency=args.concurrency,
                processes=args.processes, run_tag=f"{args.tag}-{number}{int(with_subscribers)}",
                workload=workload)
            log.info("throughput round %d, %d subscribers (load %s)", number,
                     args.subscribers if with_subscribers else 0, os.getloadavg())
            if with_subscribers:
                async with Subscribers(server.target, filters, args.batches) as subscribers:
                    figures = await throughput_round(config, server, subscribers, redis)
            else:
                figures = await throughput_round(config, server, None, redis)
            figures["round"] = number
            rounds.append(figures)
            log.info("  %.0f req/s, server %.3f + Redis %.3f ms CPU/request, %.1f hub reads "
                     "per 1000 requests, %d events delivered (%.0f/s), errors %s",
                     figures["throughput_rps"], figures["server_cpu_ms_per_request"] or 0,
                     figures["redis_cpu_ms_per_request"], figures["hub_reads_per_1000_requests"],
                     figures["events_delivered"], figures["events_delivered_per_s"],
                     figures["errors"])
    none = [r for r in rounds if r["subscribers"] == 0]
    some = [r for r in rounds if r["subscribers"] > 0]
    none_rps = sum(r["requests_measured"] for r in none) / (len(none) * args.duration_s)
    some_rps = sum(r["requests_measured"] for r in some) / (len(some) * args.duration_s)
    ratio = some_rps / none_rps if none_rps else 0.0
    cpu_none = statistics.fmean(r["server_cpu_ms_per_request"] or 0 for r in none)
    cpu_some = statistics.fmean(r["server_cpu_ms_per_request"] or 0 for r in some)
    redis_none = statistics.fmean(r["redis_cpu_ms_per_request"] for r in none)
    redis_some = statistics.fmean(r["redis_cpu_ms_per_request"] for r in some)
    return {
        "subscribers": args.subscribers, "filter": args.filter, "batches": args.batches,
        "batch_linger_s": args.batch_linger_s,
        "concurrency": args.concurrency, "processes": args.processes,
        "rps_without": round(none_rps, 1), "rps_with": round(some_rps, 1),
        "ratio": round(ratio, 3),
        "ratio_per_round": [round(b["throughput_rps"] / a["throughput_rps"], 3)
                            if a["throughput_rps"] else None for a, b in zip(none, some,
                                                                              strict=True)],
        "server_cpu_ms_per_request_without": round(cpu_none, 4),
        "server_cpu_ms_per_request_with": round(cpu_some, 4),
        "ratio_per_server_cpu_second": round(cpu_none / cpu_some, 3) if cpu_some else None,
        "redis_cpu_ms_per_request_without": round(redis_none, 4),
        "redis_cpu_ms_per_request_with": round(redis_some, 4),
        # server and Redis together: what the subscribers cost a machine running both
        "ratio_per_server_and_redis_cpu_second": round(
            (cpu_none + redis_none) / (cpu_some + redis_some), 3) if cpu_some else None,
        "goal_ratio_ge_0_9": ratio >= GOAL_RATIO,
        "rounds": rounds,
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=bounded(1, MAX_RATE), default=200.0,
                        help="latency: Event requests per second (default 200)")
    parser.add_argument("--latency-s", type=bounded(0, MAX_SECONDS), default=20.0,
                        help="latency: measured seconds (0: skip; default 20)")
    parser.add_argument("--latency-accounts", type=int, choices=range(1, 101), default=4,
                        metavar="1..100")
    parser.add_argument("--duration-s", type=bounded(1, MAX_SECONDS), default=15.0,
                        help="throughput: measured window of each round (default 15)")
    parser.add_argument("--warmup-s", type=bounded(0, 60), default=2.0)
    parser.add_argument("--rounds", type=int, choices=range(0, 11), default=2,
                        metavar="0..10", help="(none, with subscribers) pairs; 0: skip")
    parser.add_argument("--subscribers", type=int, choices=range(1, 1001), default=100,
                        metavar="1..1000")
    parser.add_argument("--filter", choices=("mix", "own"), default="mix")
    parser.add_argument("--batches", action="store_true",
                        help="subscribers use SubscribeBatches instead of Subscribe")
    parser.add_argument("--batch-linger-s", type=bounded(0, MAX_BATCH_LINGER_S), default=None,
                        help="the server's subscriber_batch_linger_s (default: its own)")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--hot-accounts", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not args.subscribers <= args.accounts <= 100_000:
        parser.error("--accounts: --subscribers..100000")
    args.tag = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_arguments(argv)
    import uvloop

    load = [round(x, 2) for x in os.getloadavg()]
    started_at = datetime.datetime.now(datetime.UTC)
    figures = uvloop.run(run(args))
    results = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.notify_bench", *sys.argv[1:]]),
        "machine": {"cpu_count": psutil.cpu_count(), "load_average_at_start": load,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "grpcio": grpc.__version__},
        **figures,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"notify-{args.tag}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    summary: dict[str, Any] = {"load_average_at_start": load}
    if "latency" in figures:
        summary["latency"] = {k: figures["latency"][k] for k in (
            "send_to_event", "send_to_answer", "events_missing", "goal_p99_le_10ms")}
    if "throughput" in figures:
        summary["throughput"] = {k: v for k, v in figures["throughput"].items()
                                 if k != "rounds"}
    print(json.dumps(summary, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
