"""The benchmark in one command: starts a redis-server, the Creditline server, the
do-nothing baseline server and the round-trip floor (the baseline making one do-nothing
EVALSHA per call), each its own process, creates the accounts, drives the load and writes
bench/results/<timestamp>.json and .png.

    python -m bench.run --duration-s 20 --rounds 2 --processes 2 --concurrency 128

Phases, in this order (each measured for --duration-s after --warmup-s):
 1. a short closed-loop warm-up of Creditline (connections opened, script loaded);
 2. saturation, --rounds times: closed loop against the do-nothing baseline server, the
    round-trip floor (unless --no-round-trip-floor), then the same driver against
    Creditline, with INFO commandstats read before and after each phase (Redis round
    trips per request); with the `stream` scenario, the same flows
    over Charging.Stream after them in each round (baseline, then Creditline);
 3. creditline open loop at fractions of its saturation rate (--load-fractions), and the
    baseline at half of it: p50/p90/p99 per offered load;
 4. Redis memory per open session: --memory-sessions sessions opened (Initial) and left
    open, INFO used_memory before and after; then closed again;
 5. soak: open loop at half saturation for --soak-s, the server's RSS sampled each second.

The machine is shared and small: every figure is noisy, so the ratios of figures measured
side by side in this one run are what to compare; CPU use of each process and of the
whole machine during each window is recorded next to the figures, and the server CPU per
request gives the ratio each server would reach with a whole core.
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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import psutil
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis.asyncio import Redis

from bench import redis_stats
from bench.driver import (
    CLOSED_LOOP,
    MAX_DURATION_S,
    OPEN_LOOP,
    PROCESS_START_ALLOWANCE_S,
    STREAM,
    UNARY,
    DriverConfig,
    DriverResult,
    run_processes,
)
from bench.workload import Workload, session_id, session_requests

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 30.0
SERVER_STOP_TIMEOUT_S = 15.0
# Admin calls in flight while the accounts are created.
ACCOUNT_CREATION_CONCURRENCY = 64
# Before the creditline saturation phase: opens the server's Redis connections and loads
# the charging script, so that the round-trip count measures the steady state.
CREDITLINE_WARMUP_S = 3.0
RSS_SAMPLE_INTERVAL_S = 1.0
CPU_WATCH_MARGIN_S = 0.5
# The goals of issue 6.
GOAL_RATIO_TO_BASELINE = 0.8
# How far the req/s ratio and the CPU-normalised ratio may differ before the run says so.
RATIO_DISAGREEMENT = 0.15
GOAL_P99_MS = 5.0
GOAL_ROUND_TRIPS_PER_REQUEST = 1.0
# Streaming credit control against Creditline's unary requests/s, same run.
GOAL_STREAM_RATIO_TO_UNARY = 2.5
SCENARIOS = (UNARY, STREAM)
# The server's RSS is "flat" when it grew by at most this much over the soak window
# (floor of the last quarter of the samples against the floor of the first: soak_summary).
FLAT_RSS_GROWTH_PERCENT = 5.0
# The name of the round-trip floor server (bench/baseline_server.py --redis-url).
ROUND_TRIP_FLOOR = "roundtrip"


class ServerProcess:
    """A gRPC server child process (Creditline or the baseline) with its log in a file."""

    def __init__(self, name: str, args: list[str], port: int, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(args, cwd=ROOT, stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.ps = psutil.Process(self.process.pid)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        async with grpc.aio.insecure_channel(self.target) as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start: {self.log_tail()}")
                try:
                    await asyncio.wait_for(channel.channel_ready(), 0.5)
                    return
                except TimeoutError:
                    continue
        raise RuntimeError(f"{self.name} did not listen within {SERVER_START_TIMEOUT_S} s")

    def processes(self) -> list[psutil.Process]:
        """The server and its children (a server with several workers forks them)."""
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for process in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def _cpu_s(processes: list[psutil.Process]) -> dict[int, float]:
    times = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu = process.cpu_times()
            times[process.pid] = cpu.user + cpu.system
    return times


class CpuWatch:
    """CPU seconds of our processes and busy share of the whole machine over a window."""

    def __init__(self, groups: dict[str, list[psutil.Process]]) -> None:
        self._groups = groups
        self._start = {name: _cpu_s(procs) for name, procs in groups.items()}
        self._machine = psutil.cpu_times()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall_s = time.perf_counter() - self._wall
        percent: dict[str, float] = {}
        for name, procs in self._groups.items():
            now = _cpu_s(procs)
            used = sum(now[pid] - self._start[name].get(pid, 0.0) for pid in now)
            percent[f"{name}_cpu_percent"] = round(100.0 * used / wall_s, 1)
        machine = psutil.cpu_times()
        busy = [(getattr(machine, f) - getattr(self._machine, f))
                for f in ("user", "system", "nice", "irq", "softirq", "steal")]
        idle = (machine.idle - self._machine.idle) + (machine.iowait - self._machine.iowait)
        percent["machine_busy_percent"] = round(100.0 * sum(busy) / (sum(busy) + idle), 1)
        ours = sum(v for k, v in percent.items() if k != "machine_busy_percent")
        # what other users of the machine took, in percent of one core
        percent["others_cpu_percent"] = round(
            max(0.0, percent["machine_busy_percent"] * psutil.cpu_count() - ours), 1)
        return percent


def redis_server_ps(port: int) -> psutil.Process:
    """Our redis-server child, found by its --port argument (RedisProcess keeps its
    process private)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            # redis-server rewrites its command line to "redis-server 127.0.0.1:<port>"
            if "redis-server" in child.name() and any(
                    str(port) in part for part in child.cmdline()):
                return child
    raise RuntimeError(f"no redis-server child on port {port}")


class Bench:
    def __init__(self, args: argparse.Namespace, redis: Redis, redis_process: RedisProcess,
                 creditline: ServerProcess, baseline: ServerProcess,
                 floor: ServerProcess | None = None) -> None:
        self.args = args
        self.redis = redis
        self.redis_ps = redis_server_ps(redis_process.port)
        self.creditline = creditline
        self.baseline = baseline
        self.floor = floor
        self.workload = Workload(
            account_count=args.accounts, hot_account_count=args.hot_accounts,
            hot_share=args.hot_share, event_request_share=args.event_share)
        self.in_script = redis_stats.script_commands()
        self.phases: dict[str, dict[str, Any]] = {}
        self.trips: dict[str, redis_stats.RoundTrips] = {}
        self._tags = 0

    def config(self, server: ServerProcess, mode: str, **changes: Any) -> DriverConfig:
        self._tags += 1
        settings: dict[str, Any] = {
            "target": server.target, "mode": mode, "duration_s": self.args.duration_s,
            "warmup_s": self.args.warmup_s, "concurrency": self.args.concurrency,
            "processes": self.args.processes,
            "channels_per_process": self.args.channels_per_process,
            "streams_per_process": self.args.streams_per_process,
            "run_tag": f"{self.args.tag}-{self._tags:02d}", "workload": self.workload,
            **changes,
        }
        return DriverConfig(**settings)

    async def create_accounts(self) -> dict[str, Any]:
        accounts = self.workload.all_accounts()
        started = time.perf_counter()
        failures: dict[str, int] = {}
        limit = asyncio.Semaphore(ACCOUNT_CREATION_CONCURRENCY)
        async with grpc.aio.insecure_channel(self.creditline.target) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)

            async def create(account_id: str, balance_micros: int) -> None:
                async with limit:
                    try:
                        await admin.CreateAccount(admin_pb.CreateAccountRequest(
                            account_id=account_id, initial_balance_micros=balance_micros),
                            timeout=10.0)
                    except grpc.aio.AioRpcError as error:
                        failures[error.code().name] = failures.get(error.code().name, 0) + 1

            await asyncio.gather(*(create(a, b) for a, b in accounts))
        elapsed_s = time.perf_counter() - started
        if failures:
            raise RuntimeError(f"account creation failed: {failures}")
        log.info("created %d accounts in %.1f s", len(accounts), elapsed_s)
        return {"accounts": len(accounts), "duration_s": round(elapsed_s, 2),
                "accounts_per_s": round(len(accounts) / elapsed_s, 1)}

    def _cpu_groups(self, server: ServerProcess) -> dict[str, list[psutil.Process]]:
        servers = {p.pid for s in (self.creditline, self.baseline, self.floor)
                   if s is not None for p in s.processes()}
        servers.add(self.redis_ps.pid)
        drivers = [p for p in psutil.Process().children(recursive=True) if p.pid not in servers]
        return {"server": server.processes(), "redis": [self.redis_ps],
                "driver": [psutil.Process(), *drivers]}

    async def _watch_window(self, config: DriverConfig, server: ServerProcess,
                            start_at_unix_s: float, rss_samples: list[tuple[float, int]] | None
                            ) -> dict[str, float]:
        """CPU use over the measured window of a phase (drivers exist by then)."""
        await asyncio.sleep(max(0.0, start_at_unix_s + config.warmup_s - time.time()))
        watch = CpuWatch(self._cpu_groups(server))
        # Stop a little before the drivers do: a driver process that has exited can no
        # longer say how much CPU it used. Percentages are over the watched time.
        window_end = time.monotonic() + max(0.5, config.duration_s - CPU_WATCH_MARGIN_S)
        # one sample per interval: bounded by the duration
        while rss_samples is not None and time.monotonic() < window_end:
            rss_samples.append((time.time() - start_at_unix_s - config.warmup_s,
                                server.rss_bytes()))
            await asyncio.sleep(min(RSS_SAMPLE_INTERVAL_S,
                                    max(0.0, window_end - time.monotonic())))
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        return watch.stop()

    async def phase(self, name: str, config: DriverConfig, server: ServerProcess,
                    rss_samples: list[tuple[float, int]] | None = None) -> DriverResult:
        log.info("phase %s: %s loop, %s for %.0f s", name, config.mode,
                 f"{config.rate_rps:.0f} req/s offered" if config.mode == OPEN_LOOP
                 else f"{config.concurrency} flows in flight", config.duration_s)
        before = await redis_stats.command_calls(self.redis)
        start_at_unix_s = time.time() + PROCESS_START_ALLOWANCE_S
        watcher = asyncio.create_task(
            self._watch_window(config, server, start_at_unix_s, rss_samples))
        try:
            result = await asyncio.to_thread(run_processes, config, start_at_unix_s)
        except BaseException:
            watcher.cancel()
            raise
        cpu = await watcher
        after = await redis_stats.command_calls(self.redis)
        trips = redis_stats.round_trips(before, after, result.requests_total, self.in_script)
        summary = result.summary()
        summary.update(server=server.name, cpu=cpu, redis=trips.summary(),
                       cpu_ms_per_request=_cpu_per_request(cpu, result),
                       server_rss_mib=round(server.rss_bytes() / 2**20, 1))
        self.phases[name] = summary
        self.trips[name] = trips
        latency = summary["latency"]["all"]
        log.info("  %.0f req/s, p50 %.2f p90 %.2f p99 %.2f ms, errors %d, shed %d, "
                 "round trips/request %.3f, cpu %s", result.throughput_rps, latency["p50_ms"],
                 latency["p90_ms"], latency["p99_ms"], result.error_count, result.shed,
                 trips.per_request, cpu)
        return result

    def aggregate(self, name: str, parts: dict[str, DriverResult]) -> DriverResult:
        """One figure from alternating rounds: all their answers over all their windows."""
        first = next(iter(parts.values()))
        merged = DriverResult(first.mode, sum(r.duration_s for r in parts.values()),
                              0.0, first.processes)
        by_command: dict[str, int] = {}
        for part in parts:
            merged.merge(parts[part])
            for command, count in self.trips[part].by_command.items():
                by_command[command] = by_command.get(command, 0) + count
        trips = redis_stats.RoundTrips(
            requests=sum(self.trips[p].requests for p in parts),
            client_commands=sum(self.trips[p].client_commands for p in parts),
            connection_commands=sum(self.trips[p].connection_commands for p in parts),
            background_commands=sum(self.trips[p].background_commands for p in parts),
            in_script_commands=sum(self.trips[p].in_script_commands for p in parts),
            by_command=by_command)
        cpu_keys = self.phases[next(iter(parts))]["cpu"]
        summary = merged.summary()
        cpu = {key: round(sum(self.phases[p]["cpu"][key] for p in parts) / len(parts), 1)
               for key in cpu_keys}
        summary.update(
            server=self.phases[next(iter(parts))]["server"], rounds=list(parts),
            throughput_rps_per_round=[self.phases[p]["throughput_rps"] for p in parts],
            redis=trips.summary(), cpu=cpu, cpu_ms_per_request=_cpu_per_request(cpu, merged))
        self.phases[name] = summary
        self.trips[name] = trips
        return merged

    async def memory_per_open_session(self) -> dict[str, Any]:
        """Opens --memory-sessions sessions (one per account: what a subscriber base
        looks like) and leaves them open while used_memory is read; then closes them."""
        count = min(self.args.memory_sessions, self.workload.account_count)
        limit = asyncio.Semaphore(ACCOUNT_CREATION_CONCURRENCY)
        flows = [session_requests(session_id("mem", self.args.tag, i),
                                  self.workload.account_id(i), 0) for i in range(count)]
        async with grpc.aio.insecure_channel(self.creditline.target) as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)

            async def send(method: str, request: pb.CreditControlRequest) -> int:
                async with limit:
                    call = charging.Initial if method == "Initial" else charging.Terminate
                    answer = await call(request, timeout=10.0)
                    code: int = answer.result_code
                    return code

            keys_before = await self.redis.dbsize()
            before = await redis_stats.used_memory_bytes(self.redis)
            opened = await asyncio.gather(*(send(*flow[0]) for flow in flows))
            keys_open = await self.redis.dbsize()
            with_open = await redis_stats.used_memory_bytes(self.redis)
            closed = await asyncio.gather(*(send(*flow[-1]) for flow in flows))
            after_close = await redis_stats.used_memory_bytes(self.redis)
        opened_count = sum(1 for code in opened if code == pb.SUCCESS)
        if opened_count != count or any(code != pb.SUCCESS for code in closed):
            raise RuntimeError(f"memory phase: {opened_count}/{count} sessions opened")
        result = {
            "sessions": count,
            "used_memory_before_bytes": before,
            "used_memory_open_bytes": with_open,
            "used_memory_closed_bytes": after_close,
            "bytes_per_open_session": round((with_open - before) / count, 1),
            "keys_per_open_session": round((keys_open - keys_before) / count, 2),
            # a closed session's answer is kept answer_retention_s for retransmissions
            "bytes_per_closed_session_retained": round((after_close - before) / count, 1),
        }
        log.info("Redis memory: %.0f bytes per open session, %.0f per closed one retained",
                 result["bytes_per_open_session"], result["bytes_per_closed_session_retained"])
        return result


def _cpu_per_request(cpu: dict[str, float], result: DriverResult) -> dict[str, float]:
    """CPU milliseconds per answered request in the window, per process group: what a
    request costs, whatever share of the cores other users of the machine took."""
    if not result.requests:
        return {}
    return {key.removesuffix("_cpu_percent"): round(
                percent / 100.0 * result.duration_s * 1000.0 / result.requests, 4)
            for key, percent in cpu.items()
            if key in ("server_cpu_percent", "redis_cpu_percent", "driver_cpu_percent")}


def _slope_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s for s, _ in samples]
    ys = [b / 2**20 for _, b in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return 0.0
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return covariance / var_x * 60.0


def soak_summary(samples: list[tuple[float, int]], duration_s: float) -> dict[str, Any]:
    """RSS moves with the requests in flight: a latency spike on a shared machine holds
    thousands of them for a while, then frees them. So the growth compares the floors (the
    10th percentile) of the first and the last quarter of the samples, which a leak raises
    and a transient backlog does not; the medians and the maximum are reported beside."""
    if not samples:
        return {"duration_s": duration_s, "samples": 0}
    quarter = max(1, len(samples) // 4)
    first = sorted(b for _, b in samples[:quarter])
    last = sorted(b for _, b in samples[-quarter:])
    first_floor, last_floor = first[len(first) // 10], last[len(last) // 10]
    growth = 100.0 * (last_floor - first_floor) / first_floor
    median_growth = 100.0 * (statistics.median(last) - statistics.median(first)) / (
        statistics.median(first))
    return {
        "duration_s": duration_s,
        "samples": len(samples),
        "rss_first_quarter_floor_mib": round(first_floor / 2**20, 2),
        "rss_last_quarter_floor_mib": round(last_floor / 2**20, 2),
        "rss_growth_percent": round(growth, 2),
        "rss_median_growth_percent": round(median_growth, 2),
        "rss_max_mib": round(max(b for _, b in samples) / 2**20, 2),
        "rss_slope_mib_per_min": round(_slope_per_min(samples), 3),
        "flat": growth <= FLAT_RSS_GROWTH_PERCENT,
        "rss_mib_series": [[round(t, 1), round(b / 2**20, 2)] for t, b in samples],
    }


def _figures(phases: dict[str, dict[str, Any]], half_name: str, memory: dict[str, Any],
             soak: dict[str, Any]) -> dict[str, Any]:
    baseline = phases["baseline_saturation"]["throughput_rps"]
    creditline = phases["creditline_saturation"]["throughput_rps"]
    baseline_cpu_ms = phases["baseline_saturation"]["cpu_ms_per_request"].get("server", 0.0)
    creditline_cpu_ms = phases["creditline_saturation"]["cpu_ms_per_request"].get("server", 0.0)
    ratio = creditline / baseline if baseline else 0.0
    per_round = [c / b if b else 0.0 for b, c in zip(
        phases["baseline_saturation"]["throughput_rps_per_round"],
        phases["creditline_saturation"]["throughput_rps_per_round"], strict=True)]
    half = phases[half_name]
    trips = phases["creditline_saturation"]["redis"]["round_trips_per_request"]
    p99 = half["latency"]["all"]["p99_ms"]
    figures: dict[str, Any] = {
        "baseline_rps": baseline,
        "creditline_rps": creditline,
        "ratio_to_baseline": round(ratio, 3),
        "ratio_to_baseline_per_round": [round(r, 3) for r in per_round],
        # server CPU per request at saturation, and the ratio it implies for a server that
        # gets a whole core: less sensitive to other users of the machine than req/s
        "server_cpu_ms_per_request": {"baseline": baseline_cpu_ms,
                                      "creditline": creditline_cpu_ms},
        "redis_cpu_ms_per_request": phases["creditline_saturation"][
            "cpu_ms_per_request"].get("redis", 0.0),
        "cpu_normalised_ratio_to_baseline": round(
            baseline_cpu_ms / creditline_cpu_ms, 3) if creditline_cpu_ms else None,
        "half_saturation": {
            "offered_rps": half["offered_rps"], "achieved_rps": half["throughput_rps"],
            **{k: half["latency"]["all"][k] for k in ("p50_ms", "p90_ms", "p99_ms")},
            "p99_from_due_ms": (half["latency_from_due"] or {}).get("p99_ms"),
        },
        "round_trips_per_request": trips,
        "redis_bytes_per_open_session": memory.get("bytes_per_open_session"),
        "server_rss_flat": soak.get("flat"),
        # the two ratios disagree when others took more CPU from one server's phases than
        # from the other's: then the req/s ratio is not to be trusted
        "ratios_disagree": (abs(ratio - baseline_cpu_ms / creditline_cpu_ms)
                            > RATIO_DISAGREEMENT if creditline_cpu_ms else None),
        "goals": {
            "ratio_to_baseline >= 0.8": ratio >= GOAL_RATIO_TO_BASELINE,
            "ratio per server CPU second >= 0.8": (
                baseline_cpu_ms / creditline_cpu_ms >= GOAL_RATIO_TO_BASELINE
                if creditline_cpu_ms else None),
            "p99_ms at half saturation <= 5": p99 <= GOAL_P99_MS,
            "round_trips_per_request == 1.00": round(trips, 2) == GOAL_ROUND_TRIPS_PER_REQUEST,
            "server RSS flat over the soak": soak.get("flat"),
        },
    }
    if f"{ROUND_TRIP_FLOOR}_saturation" in phases:
        figures["round_trip_floor"] = _floor_figures(phases)
    if "creditline_stream_saturation" in phases:
        stream = _stream_figures(phases)
        figures["stream"] = stream
        figures["goals"]["stream >= 2.5x creditline unary req/s"] = (
            stream["ratio_to_creditline_unary"] >= GOAL_STREAM_RATIO_TO_UNARY)
    return figures


def _floor_figures(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The round-trip floor against the baseline (what one Redis round trip per call costs
    by itself) and Creditline against the floor (what the charging work costs on top)."""
    base, creditline = phases["baseline_saturation"], phases["creditline_saturation"]
    floor = phases[f"{ROUND_TRIP_FLOOR}_saturation"]
    floor_rps = floor["throughput_rps"]
    return {
        "rps": floor_rps,
        "ratio_to_baseline": round(floor_rps / base["throughput_rps"], 3)
        if base["throughput_rps"] else 0.0,
        "ratio_to_baseline_per_round": [round(f / b, 3) if b else 0.0 for b, f in zip(
            base["throughput_rps_per_round"], floor["throughput_rps_per_round"], strict=True)],
        "creditline_ratio_to_floor": round(creditline["throughput_rps"] / floor_rps, 3)
        if floor_rps else 0.0,
        "server_cpu_ms_per_request": floor["cpu_ms_per_request"].get("server", 0.0),
        "redis_cpu_ms_per_request": floor["cpu_ms_per_request"].get("redis", 0.0),
    }


def _stream_figures(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Streaming against Creditline's unary requests/s of the same run, round by round too;
    and against the do-nothing server's stream. CPU per request says the same for a
    server that gets a whole core."""
    unary, streamed = phases["creditline_saturation"], phases["creditline_stream_saturation"]
    base = phases["baseline_stream_saturation"]
    ratio = streamed["throughput_rps"] / unary["throughput_rps"] if unary[
        "throughput_rps"] else 0.0
    unary_cpu_ms = unary["cpu_ms_per_request"].get("server", 0.0)
    stream_cpu_ms = streamed["cpu_ms_per_request"].get("server", 0.0)
    return {
        "creditline_rps": streamed["throughput_rps"],
        "baseline_rps": base["throughput_rps"],
        "ratio_to_creditline_unary": round(ratio, 3),
        "ratio_to_creditline_unary_per_round": [
            round(st / un, 3) if un else 0.0 for un, st in zip(
                unary["throughput_rps_per_round"], streamed["throughput_rps_per_round"],
                strict=True)],
        "ratio_to_baseline_stream": round(streamed["throughput_rps"] / base["throughput_rps"],
                                          3) if base["throughput_rps"] else 0.0,
        "server_cpu_ms_per_request": {
            "baseline": base["cpu_ms_per_request"].get("server", 0.0),
            "creditline": stream_cpu_ms},
        "cpu_normalised_ratio_to_creditline_unary": round(
            unary_cpu_ms / stream_cpu_ms, 3) if stream_cpu_ms else None,
        "errors": streamed["errors"],
    }


def _machine() -> dict[str, Any]:
    import grpc as grpc_module
    import redis as redis_module

    return {
        "cpu_count": psutil.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc_module.__version__,
        "redis_py": redis_module.__version__,
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def _servers(args: argparse.Namespace, redis_url: str, log_dir: Path
             ) -> Iterator[tuple[ServerProcess, ServerProcess, ServerProcess | None]]:
    port = free_port()
    creditline = ServerProcess("creditline", [
        sys.executable, "-m", "creditline", "serve", "--redis-url", redis_url,
        "--listen-address", f"127.0.0.1:{port}", "--log-level", "WARNING",
        # one process, as the baseline (serve's default is one per core); a
        # --server-arg=--workers=N given to the benchmark comes later and wins
        "--workers", "1", *args.server_arg], port, log_dir)
    baseline_port = free_port()
    baseline = ServerProcess("baseline", [
        sys.executable, "-m", "bench.baseline_server",
        "--listen-address", f"127.0.0.1:{baseline_port}"], baseline_port, log_dir)
    floor = None
    if args.round_trip_floor:
        floor_port = free_port()
        floor = ServerProcess(ROUND_TRIP_FLOOR, [
            sys.executable, "-m", "bench.baseline_server", "--redis-url", redis_url,
            "--listen-address", f"127.0.0.1:{floor_port}"], floor_port, log_dir)
    try:
        yield creditline, baseline, floor
    finally:
        for server in (creditline, baseline, *([floor] if floor else [])):
            code = server.stop()
            if code not in (0, -signal.SIGTERM):
                log.warning("%s exited with %s: %s", server.name, code, server.log_tail())


@contextlib.asynccontextmanager
async def _redis_client(url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="creditline-bench-") as tmp, \
            RedisProcess() as redis_process, \
            _servers(args, redis_process.url, Path(tmp)) as (creditline, baseline, floor):
        await asyncio.gather(creditline.wait_ready(), baseline.wait_ready(),
                             *([floor.wait_ready()] if floor else []))
        async with _redis_client(redis_process.url) as redis:
            bench = Bench(args, redis, redis_process, creditline, baseline, floor)
            accounts = await bench.create_accounts()
            results = await _phases(bench, creditline, baseline)
            results["accounts"] = accounts
            results["redis_server"] = (await redis.info("server"))["redis_version"]
    results.update(started_at=started_at.isoformat(timespec="seconds"),
                   command=" ".join(["python -m bench.run", *sys.argv[1:]]),
                   machine=_machine(), workload=asdict(bench.workload),
                   arguments=vars(args))
    return results


async def _phases(bench: Bench, creditline: ServerProcess, baseline: ServerProcess
                  ) -> dict[str, Any]:
    args = bench.args
    await bench.phase("creditline_warmup", bench.config(
        creditline, CLOSED_LOOP, duration_s=CREDITLINE_WARMUP_S, warmup_s=0.0), creditline)
    # Baseline and creditline alternate, round after round: load from other users of the
    # machine then hits both alike, and the ratio of each round shows how much it moved.
    # The scenarios' saturation phases by transport: {scenario: (baselines, creditlines)}.
    rounds: dict[str, tuple[dict[str, DriverResult], dict[str, DriverResult]]] = {
        scenario: ({}, {}) for scenario in args.scenarios}
    floors: dict[str, DriverResult] = {}
    for number in range(1, args.rounds + 1):
        for scenario, (baselines, creditlines) in rounds.items():
            infix = "" if scenario == UNARY else f"_{scenario}"
            servers = [(baseline, baselines), (creditline, creditlines)]
            if bench.floor is not None and scenario == UNARY:  # the floor of unary calls
                servers.insert(1, (bench.floor, floors))
            for server, results in servers:
                name = f"{server.name}{infix}_saturation_round{number}"
                results[name] = await bench.phase(name, bench.config(
                    server, CLOSED_LOOP, transport=scenario), server)
    base = bench.aggregate("baseline_saturation", rounds[UNARY][0])
    if floors:
        bench.aggregate(f"{ROUND_TRIP_FLOOR}_saturation", floors)
    saturated = bench.aggregate("creditline_saturation", rounds[UNARY][1])
    if STREAM in rounds:
        bench.aggregate("baseline_stream_saturation", rounds[STREAM][0])
        streamed = bench.aggregate("creditline_stream_saturation", rounds[STREAM][1])
        log.info("stream saturation: creditline %.0f req/s, %.2f x its unary req/s",
                 streamed.throughput_rps,
                 streamed.throughput_rps / max(saturated.throughput_rps, 1e-9))
    log.info("saturation: baseline %.0f req/s, creditline %.0f req/s (ratio %.2f)",
             base.throughput_rps, saturated.throughput_rps,
             saturated.throughput_rps / max(base.throughput_rps, 1e-9))
    saturation_rps = saturated.throughput_rps
    if saturated.requests == 0 or base.requests == 0:
        raise RuntimeError("a saturation phase served nothing: see the errors above")
    half_name = "creditline_open_0.5"
    for fraction in sorted({*args.load_fractions, 0.5}):
        await bench.phase(f"creditline_open_{fraction:g}", bench.config(
            creditline, OPEN_LOOP, rate_rps=fraction * saturation_rps), creditline)
    await bench.phase("baseline_open_0.5", bench.config(
        baseline, OPEN_LOOP, rate_rps=0.5 * saturation_rps), baseline)
    memory = await bench.memory_per_open_session()
    soak: dict[str, Any] = {}
    if args.soak_s > 0:
        samples: list[tuple[float, int]] = []
        await bench.phase("creditline_soak", bench.config(
            creditline, OPEN_LOOP, rate_rps=0.5 * saturation_rps, duration_s=args.soak_s),
            creditline, rss_samples=samples)
        soak = soak_summary(samples, args.soak_s)
        log.info("soak: server RSS floor (first, last quarter) %.1f -> %.1f MiB "
                 "(%+.1f%%), slope %.2f MiB/min", soak.get("rss_first_quarter_floor_mib", 0),
                 soak.get("rss_last_quarter_floor_mib", 0),
                 soak.get("rss_growth_percent", 0), soak.get("rss_slope_mib_per_min", 0))
    return {"figures": _figures(bench.phases, half_name, memory, soak),
            "phases": bench.phases, "memory": memory, "soak": soak}


def _fractions(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values or any(not 0 < v <= 1.5 for v in values):
        raise argparse.ArgumentTypeError("fractions of the saturation rate in (0, 1.5]")
    return values


def _scenarios(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if UNARY not in values or not set(values) <= set(SCENARIOS):
        raise argparse.ArgumentTypeError(
            f"a list of {', '.join(SCENARIOS)}; {UNARY} is required (the reference)")
    return [s for s in SCENARIOS if s in values]


def bounded(low: float, high: float) -> Any:
    """An argparse type: a float within [low, high]."""
    def parse(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}]")
        return value
    return parse


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=bounded(1, MAX_DURATION_S), default=20.0,
                        help="measured window of each phase (default 20)")
    parser.add_argument("--warmup-s", type=bounded(0, 600), default=3.0,
                        help="load before each window, not measured (default 3)")
    parser.add_argument("--rounds", type=int, choices=range(1, 11), default=2,
                        metavar="1..10", help="alternating baseline/creditline saturation "
                        "rounds, each --duration-s long (default 2)")
    parser.add_argument("--processes", type=int, default=2, help="driver processes")
    parser.add_argument("--channels-per-process", type=int, default=1)
    parser.add_argument("--scenarios", type=_scenarios, default=list(SCENARIOS),
                        help="transports of the saturation rounds: unary (always: the "
                        "reference) and stream, the same flows over Charging.Stream "
                        "(default unary,stream)")
    parser.add_argument("--streams-per-process", type=int, default=4,
                        help="stream scenario: Charging.Stream calls per driver process, "
                        "the flows multiplexed over them (default 4)")
    parser.add_argument("--concurrency", type=int, default=128,
                        help="closed loop: session flows in flight, all processes together")
    parser.add_argument("--load-fractions", type=_fractions, default=[0.25, 0.5, 0.75],
                        help="open-loop offered loads, fractions of creditline saturation")
    parser.add_argument("--soak-s", type=bounded(0, MAX_DURATION_S), default=60.0,
                        help="soak at half saturation, server RSS sampled (0: none; 600 "
                             "for the 10-minute goal)")
    parser.add_argument("--memory-sessions", type=int, default=5_000,
                        help="sessions left open to measure Redis memory per session")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--hot-accounts", type=int, default=5)
    parser.add_argument("--hot-share", type=float, default=0.10,
                        help="share of sessions and events on the hot accounts")
    parser.add_argument("--event-share", type=float, default=0.20,
                        help="share of requests that are Event DIRECT_DEBIT")
    parser.add_argument("--round-trip-floor", action=argparse.BooleanOptionalAction,
                        default=True, help="measure the round-trip floor in each unary round "
                        "(the baseline making one do-nothing EVALSHA per call)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for `creditline serve` (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.tag = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return args


def write_results(path: Path, results: dict[str, Any]) -> Path:
    """A run's results as JSON (bench/results/ is not in git: keep a run worth keeping
    in bench/reference-runs/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_arguments(argv)
    import uvloop

    results = uvloop.run(run(args))
    results["arguments"]["out"] = str(args.out)
    json_path = write_results(args.out / f"{args.tag}.json", results)
    log.info("results: %s", json_path)
    if not args.no_plot:
        from bench.plot import plot

        png_path = plot(results, json_path.with_suffix(".png"))
        log.info("plot: %s", png_path)
    print(json.dumps(results["figures"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
