"""Diameter CCR-U per second per server process against gRPC unary Update and the same
Update carried by Charging.Stream, in one run (issue 18).

    python -m bench.diameter_bench [--duration-s 8] [--rounds 2] [--accounts 1000]
                                   [--in-flight 64]

Starts a redis-server and one Creditline server process (`--workers 1`, Diameter on a
free loopback port, `--diameter-identity-fallback data`: the Subscription-Id-Data is the
account id), creates the accounts through Admin and opens one gRPC session (Initial) and
one Diameter session (CCR-I) per account. Then, `--rounds` times, three phases in turn,
each `--warmup-s` unmeasured and `--duration-s` measured, `--in-flight` requests
outstanding all the time (closed loop):

 - unary:    Charging.Update on one channel;
 - stream:   the same Update as StreamRequests on `--streams` Charging.Stream calls of
             one channel (answers matched by correlation id);
 - diameter: CCR-U over ONE TCP connection (CER first), answers matched by hop-by-hop id.

Every request is the same charging work: rating group 100 (voice, time) of the default
plan, 60 s used and 300 s asked again; a session never has two requests outstanding and
its request numbers go up by one. Per phase: answered requests/s, the server process's
CPU seconds per request (psutil, as bench/run.py), Redis's too, p50/p99 latency (send to
answer), and every answer's result code (top level and the rating group's: anything
but 2001 is a failure). Ratios: Diameter / unary and Diameter / stream, per round and
over all rounds. Writes bench/results/diameter-<timestamp>.json and prints a table.

The load generator is one Python process on the same cores as the server: the server's
CPU per request is the figure that does not depend on how much of a core it got.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import psutil
from creditline.diameter import message as dm
from creditline.diameter.codec import FLAG_PROXIABLE, FLAG_REQUEST, Avp, codec
from creditline.diameter.dictionary import CREDIT_CONTROL_APPLICATION, AvpCode, Command
from creditline.diameter.message import Message
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from redis.asyncio import Redis

from bench import redis_stats
from bench.histogram import LatencyHistogram
from bench.run import (
    ROOT,
    ServerProcess,
    _cpu_s,
    _machine,
    _redis_client,
    bounded,
    redis_server_ps,
    write_results,
)
from bench.stream_calls import CallFailedError, StreamCalls
from bench.workload import HOT_ACCOUNT_BALANCE_MICROS, RG_VOICE, VOICE_REQUESTED_S, VOICE_USED_S

log = logging.getLogger("bench.diameter")
UNARY, STREAM, DIAMETER = "unary", "stream", "diameter"
PHASES = (UNARY, STREAM, DIAMETER)
SUCCESS = 2001  # DIAMETER_SUCCESS; the gRPC API's pb.SUCCESS has the same value
CALL_TIMEOUT_S = 10.0
SETUP_CONCURRENCY = 64
DIAMETER_CONNECT_TIMEOUT_S = 10.0
ORIGIN_HOST, ORIGIN_REALM = "dbench.client", "bench"
# The default plan's voice tariff (server/creditline/charging/plans/default.toml): a
# connect fee per session; 60 s reported cost 0.60 whether first minute or per second.
VOICE_CONNECT_FEE_MICROS = 100_000
VOICE_REPORT_PRICE_MICROS = 600_000


@dataclass(slots=True)
class Session:
    session_id: str
    account_id: str
    next_number: int = 0

    def number(self) -> int:
        number, self.next_number = self.next_number, self.next_number + 1
        return number


@dataclass
class Window:
    """What one phase's measured window saw."""

    answered: int = 0
    # answers of the whole phase (warm-up and drain too), as Redis's counters see them
    total: int = 0
    failures: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def fail(self, kind: str) -> None:
        self.failures += 1
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1


# An Update of one session: the result codes of the answer (top level, then per rating
# group), or raises.
SendUpdate = Callable[[Session], Awaitable[list[int]]]


# ---------------------------------------------------------------------- gRPC requests

def _voice(requested: bool, used: bool) -> pb.RatingGroupRequest:
    block = pb.RatingGroupRequest(rating_group=RG_VOICE)
    if requested:
        block.requested.time_s = VOICE_REQUESTED_S
    if used:
        block.used.time_s = VOICE_USED_S
    return block


def grpc_request(session: Session, requested: bool = True, used: bool = True
                 ) -> pb.CreditControlRequest:
    return pb.CreditControlRequest(
        session_id=session.session_id, account_id=session.account_id,
        request_number=session.number(), rating_groups=[_voice(requested, used)])


def _grpc_codes(answer: pb.CreditControlAnswer) -> list[int]:
    return [answer.result_code, *(rg.result_code for rg in answer.rating_groups)]


# ---------------------------------------------------------------------- Diameter client

class DiameterClient(asyncio.Protocol):
    """One connection to the server: requests sent with our codec, answers matched to
    them by hop-by-hop id (they may come back in any order)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self._hops = itertools.count(1)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, port: int) -> DiameterClient:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + DIAMETER_CONNECT_TIMEOUT_S
        while True:  # (the gRPC port answering does not mean this one listens yet)
            try:
                _, client = await loop.create_connection(cls, "127.0.0.1", port)
                return client
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("diameter connection lost"))
        self._waiting.clear()
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 4:
            length = codec.message_length(bytes(buffer[:4]))
            if len(buffer) < length:
                return
            answer = dm.decode_message(bytes(buffer[:length]))
            del buffer[:length]
            future = self._waiting.pop(answer.hop_by_hop, None)
            if future is not None and not future.done():
                future.set_result(answer)

    def request(self, command: int, application: int, avps: list[Avp]
                ) -> asyncio.Future[Message]:
        assert self._transport is not None
        hop = next(self._hops) & 0xFFFFFFFF
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[hop] = future
        self._transport.write(dm.encode_message(Message(
            FLAG_REQUEST | FLAG_PROXIABLE, command, application, hop, hop, avps)))
        return future

    async def exchange_capabilities(self) -> int:
        """CER -> the CEA's Result-Code."""
        cea = await asyncio.wait_for(self.request(Command.CAPABILITIES_EXCHANGE, 0, [
            dm.text(AvpCode.ORIGIN_HOST, ORIGIN_HOST), dm.text(AvpCode.ORIGIN_REALM, ORIGIN_REALM),
            dm.address(AvpCode.HOST_IP_ADDRESS, "127.0.0.1"), dm.u32(AvpCode.VENDOR_ID, 0),
            dm.text(AvpCode.PRODUCT_NAME, "diameter_bench"),
            dm.u32(AvpCode.AUTH_APPLICATION_ID, CREDIT_CONTROL_APPLICATION)]), CALL_TIMEOUT_S)
        return _result_code(cea)

    async def credit_control(self, session: Session, request_type: int, requested: bool = True,
                             used: bool = True) -> list[int]:
        """One CCR of the session: the CCA's Result-Code, then each MSCC's."""
        inside: list[Avp] = []
        if requested:
            inside.append(dm.group(AvpCode.REQUESTED_SERVICE_UNIT,
                                   [dm.u32(AvpCode.CC_TIME, VOICE_REQUESTED_S)]))
        if used:
            inside.append(dm.group(AvpCode.USED_SERVICE_UNIT,
                                   [dm.u32(AvpCode.CC_TIME, VOICE_USED_S)]))
        inside.append(dm.u32(AvpCode.RATING_GROUP, RG_VOICE))
        avps = [dm.text(AvpCode.SESSION_ID, session.session_id),
                dm.text(AvpCode.ORIGIN_HOST, ORIGIN_HOST),
                dm.text(AvpCode.ORIGIN_REALM, ORIGIN_REALM),
                dm.text(AvpCode.DESTINATION_REALM, "localdomain"),
                dm.u32(AvpCode.AUTH_APPLICATION_ID, CREDIT_CONTROL_APPLICATION),
                dm.text(AvpCode.SERVICE_CONTEXT_ID, "32251@3gpp.org"),
                dm.u32(AvpCode.CC_REQUEST_TYPE, request_type),
                dm.u32(AvpCode.CC_REQUEST_NUMBER, session.number()),
                # in every CCR, as many gateways send it (the server reads it each time)
                dm.group(AvpCode.SUBSCRIPTION_ID, [
                    dm.u32(AvpCode.SUBSCRIPTION_ID_TYPE, 0),
                    dm.text(AvpCode.SUBSCRIPTION_ID_DATA, session.account_id)]),
                dm.group(AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL, inside)]
        cca = await asyncio.wait_for(
            self.request(Command.CREDIT_CONTROL, CREDIT_CONTROL_APPLICATION, avps),
            CALL_TIMEOUT_S)
        codes = [_result_code(cca)]
        for mscc in dm.find_all(cca.avps, AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL):
            code = dm.find(dm.grouped(mscc), AvpCode.RESULT_CODE)
            codes.append(dm.unsigned32(code) if code is not None else 0)
        return codes

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _failure_kind(error: Exception) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"gRPC {error.code().name}"
    if isinstance(error, CallFailedError):
        return f"stream {error.code}"
    return type(error).__name__


def _result_code(message: Message) -> int:
    avp = dm.find(message.avps, AvpCode.RESULT_CODE)
    return dm.unsigned32(avp) if avp is not None else 0


# ---------------------------------------------------------------------- the bench

class DiameterBench:
    def __init__(self, args: argparse.Namespace, server: ServerProcess, diameter_port: int,
                 redis: Redis, redis_ps: psutil.Process) -> None:
        self.args = args
        self.redis = redis
        self.in_script = redis_stats.script_commands()
        self.server = server
        self.diameter_port = diameter_port
        self.redis_ps = redis_ps
        prefix = f"dbench{args.tag}"
        self.accounts = [f"{prefix}-{i:06d}" for i in range(args.accounts)]
        self.grpc_sessions = [Session(f"grpc.bench;{args.tag};{i}", a)
                              for i, a in enumerate(self.accounts)]
        self.diameter_sessions = [Session(f"{ORIGIN_HOST};{args.tag};{i}", a)
                                  for i, a in enumerate(self.accounts)]
        self.setup_failures: dict[str, int] = {}
        self.phases: dict[str, dict[str, Any]] = {}

    async def _all(self, work: Callable[[Any], Awaitable[list[int]]], items: list[Any],
                   what: str) -> None:
        """`work` on every item, SETUP_CONCURRENCY at once; non-2001 codes counted."""
        limit = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(item: Any) -> None:
            async with limit:
                try:
                    codes = await work(item)
                except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as error:
                    codes = [-1]
                    log.warning("%s failed: %r", what, error)
                if any(code != SUCCESS for code in codes):
                    key = f"{what}: {codes}"
                    self.setup_failures[key] = self.setup_failures.get(key, 0) + 1
        await asyncio.gather(*(one(item) for item in items))

    async def open_sessions(self, admin: admin_pb2_grpc.AdminStub,
                            charging: charging_pb2_grpc.ChargingStub,
                            diameter: DiameterClient) -> None:
        async def create(account_id: str) -> list[int]:
            await admin.CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=HOT_ACCOUNT_BALANCE_MICROS),
                timeout=CALL_TIMEOUT_S)
            return [SUCCESS]

        async def initial(session: Session) -> list[int]:
            answer = await charging.Initial(grpc_request(session, used=False),
                                            timeout=CALL_TIMEOUT_S)
            return _grpc_codes(answer)

        async def ccr_i(session: Session) -> list[int]:
            return await diameter.credit_control(session, 1, used=False)

        started = time.perf_counter()
        await self._all(create, self.accounts, "CreateAccount")
        await self._all(initial, self.grpc_sessions, "Initial")
        await self._all(ccr_i, self.diameter_sessions, "CCR-I")
        log.info("%d accounts, %d gRPC and %d Diameter sessions open in %.1f s",
                 len(self.accounts), len(self.grpc_sessions), len(self.diameter_sessions),
                 time.perf_counter() - started)
        if self.setup_failures:
            raise RuntimeError(f"setup failed: {self.setup_failures}")

    async def close_sessions(self, charging: charging_pb2_grpc.ChargingStub,
                             diameter: DiameterClient) -> None:
        async def terminate(session: Session) -> list[int]:
            answer = await charging.Terminate(grpc_request(session, requested=False),
                                              timeout=CALL_TIMEOUT_S)
            return _grpc_codes(answer)

        async def ccr_t(session: Session) -> list[int]:
            return await diameter.credit_control(session, 3, requested=False)

        await self._all(terminate, self.grpc_sessions, "Terminate")
        await self._all(ccr_t, self.diameter_sessions, "CCR-T")

    async def check_books(self, admin: admin_pb2_grpc.AdminStub) -> dict[str, Any]:
        """Every session closed: each account paid, for its two sessions (one per
        transport), the connect fee and VOICE_USED_S of voice per report, and holds
        nothing reserved. Shows both transports charged every Update alike."""
        mismatches: dict[str, dict[str, int]] = {}
        for grpc_session, diameter_session in zip(self.grpc_sessions, self.diameter_sessions,
                                                  strict=True):
            account = await admin.GetAccount(admin_pb.GetAccountRequest(
                account_id=grpc_session.account_id), timeout=CALL_TIMEOUT_S)
            # (request numbers 1..n reported usage: all but the Initial)
            reports = grpc_session.next_number - 1 + diameter_session.next_number - 1
            expected = 2 * VOICE_CONNECT_FEE_MICROS + reports * VOICE_REPORT_PRICE_MICROS
            spent = account.initial_balance_micros - account.balance_micros
            if spent != expected or account.reserved_micros:
                mismatches[account.account_id] = {
                    "spent": spent, "expected": expected, "reserved": account.reserved_micros}
        return {"accounts": len(self.grpc_sessions), "mismatches": len(mismatches),
                "first_mismatches": dict(list(mismatches.items())[:5])}

    async def phase(self, name: str, send: SendUpdate, sessions: list[Session]) -> dict[str, Any]:
        """--in-flight workers, each going round its own share of the sessions (so no
        session has two requests outstanding), for warm-up + window; the window's
        answers, latencies, failures and CPU."""
        args = self.args
        window = Window()
        measuring = False
        stop = False

        async def worker(mine: list[Session]) -> None:
            for session in itertools.cycle(mine):
                if stop:
                    return
                sent = time.perf_counter()
                try:
                    codes = await send(session)
                except (grpc.aio.AioRpcError, CallFailedError, TimeoutError,
                        ConnectionError) as error:
                    if measuring:
                        window.fail(_failure_kind(error))
                    continue
                window.total += 1
                if not measuring:
                    continue
                window.histogram.record_s(time.perf_counter() - sent)
                window.answered += 1
                if any(code != SUCCESS for code in codes):
                    window.fail(f"result codes {codes}")

        commands_before = await redis_stats.command_calls(self.redis)
        shares = [sessions[i::args.in_flight] for i in range(args.in_flight)]
        workers = [asyncio.create_task(worker(share)) for share in shares if share]
        server_procs, redis_procs = self.server.processes(), [self.redis_ps]
        driver_procs = [psutil.Process()]
        await asyncio.sleep(args.warmup_s)
        measuring = True
        cpu_before = [_cpu_s(p) for p in (server_procs, redis_procs, driver_procs)]
        io_before = _io_calls(server_procs)
        machine_before = psutil.cpu_times()
        started = time.perf_counter()
        await asyncio.sleep(args.duration_s)
        measuring = False
        elapsed_s = time.perf_counter() - started
        cpu_after = [_cpu_s(p) for p in (server_procs, redis_procs, driver_procs)]
        io_after = _io_calls(server_procs)
        machine_after = psutil.cpu_times()
        stop = True
        await asyncio.gather(*workers)
        trips = redis_stats.round_trips(commands_before,
                                        await redis_stats.command_calls(self.redis),
                                        window.total, self.in_script)
        used_s = [sum(after[pid] - before.get(pid, 0.0) for pid in after)
                  for before, after in zip(cpu_before, cpu_after, strict=True)]
        machine_s = {f: getattr(machine_after, f) - getattr(machine_before, f)
                     for f in ("user", "system", "nice", "irq", "softirq", "steal")}
        machine_busy_s = sum(machine_s.values())
        answered = max(window.answered, 1)
        result = {
            "transport": name.split("_round")[0],
            "duration_s": round(elapsed_s, 3),
            "answered": window.answered,
            "requests_per_s": round(window.answered / elapsed_s, 1),
            "server_cpu_ms_per_request": round(used_s[0] * 1000 / answered, 4),
            "redis_cpu_ms_per_request": round(used_s[1] * 1000 / answered, 4),
            "driver_cpu_ms_per_request": round(used_s[2] * 1000 / answered, 4),
            "server_cpu_percent": round(100 * used_s[0] / elapsed_s, 1),
            "redis_cpu_percent": round(100 * used_s[1] / elapsed_s, 1),
            "driver_cpu_percent": round(100 * used_s[2] / elapsed_s, 1),
            # what the rest of the machine took, in % of one core
            "others_cpu_percent": round(max(0.0, 100 * (machine_busy_s - sum(used_s))
                                            / elapsed_s), 1),
            # read()/write() system calls of the server (sockets to the clients and to
            # Redis): what batching on either side changes
            "server_reads_per_request": round((io_after[0] - io_before[0]) / answered, 3),
            "server_writes_per_request": round((io_after[1] - io_before[1]) / answered, 3),
            # (the kernel's loopback TCP work in interrupts, counted to no process)
            "machine_softirq_percent": round(100 * machine_s["softirq"] / elapsed_s, 1),
            # the same charging work whatever the transport: one script call per request
            # and the same commands inside it
            "redis_round_trips_per_request": round(trips.per_request, 4),
            "in_script_commands_per_request": round(
                trips.in_script_commands / max(window.total, 1), 2),
            "p50_ms": round(window.histogram.percentile_ms(50), 3),
            "p99_ms": round(window.histogram.percentile_ms(99), 3),
            "failures": window.failures,
            "failure_kinds": window.failure_kinds,
        }
        self.phases[name] = result
        log.info("%-20s %8.0f req/s  server %.3f ms/req (%.0f %%)  p50 %.2f p99 %.2f ms  "
                 "failures %d", name, result["requests_per_s"],
                 result["server_cpu_ms_per_request"], result["server_cpu_percent"],
                 result["p50_ms"], result["p99_ms"], window.failures)
        return result


def _io_calls(processes: list[psutil.Process]) -> tuple[int, int]:
    """read and write system calls of the processes so far (/proc/<pid>/io)."""
    reads = writes = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            counters = process.io_counters()
            reads, writes = reads + counters.read_count, writes + counters.write_count
    return reads, writes


def _aggregate(phases: dict[str, dict[str, Any]], transport: str) -> dict[str, Any]:
    """One transport over all rounds: all answers over all windows."""
    parts = [p for p in phases.values() if p["transport"] == transport]
    duration_s = sum(p["duration_s"] for p in parts)
    answered = sum(p["answered"] for p in parts)

    def per_request(key: str) -> float:
        total_ms = sum(p[key] * max(p["answered"], 1) for p in parts)
        return round(total_ms / max(answered, 1), 4)

    return {
        "requests_per_s": round(answered / duration_s, 1),
        "requests_per_s_per_round": [p["requests_per_s"] for p in parts],
        "server_cpu_ms_per_request": per_request("server_cpu_ms_per_request"),
        "redis_cpu_ms_per_request": per_request("redis_cpu_ms_per_request"),
        "driver_cpu_ms_per_request": per_request("driver_cpu_ms_per_request"),
        "server_cpu_percent": round(sum(p["server_cpu_percent"] for p in parts) / len(parts), 1),
        "others_cpu_percent": round(sum(p["others_cpu_percent"] for p in parts) / len(parts), 1),
        # (the rounds' percentiles; the histograms are not kept)
        "p50_ms_per_round": [p["p50_ms"] for p in parts],
        "p99_ms_per_round": [p["p99_ms"] for p in parts],
        "answered": answered,
        "failures": sum(p["failures"] for p in parts),
    }


def _ratios(phases: dict[str, dict[str, Any]], totals: dict[str, dict[str, Any]],
            rounds: int) -> dict[str, Any]:
    """Diameter against each gRPC transport: throughput (> 1: Diameter answers more) and
    server CPU per request (< 1: Diameter costs the server less), overall and per round."""
    ratios: dict[str, Any] = {}
    for other in (UNARY, STREAM):
        def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
            return round(a[key] / b[key], 3) if b[key] else None
        d, o = totals[DIAMETER], totals[other]
        ratios[f"diameter_to_{other}"] = {
            "throughput": ratio(d, o, "requests_per_s"),
            "server_cpu_per_request": ratio(d, o, "server_cpu_ms_per_request"),
            "throughput_per_round": [ratio(phases[f"{DIAMETER}_round{n}"],
                                           phases[f"{other}_round{n}"], "requests_per_s")
                                     for n in range(1, rounds + 1)],
            "server_cpu_per_request_per_round": [
                ratio(phases[f"{DIAMETER}_round{n}"], phases[f"{other}_round{n}"],
                      "server_cpu_ms_per_request") for n in range(1, rounds + 1)],
        }
    unary = ratios["diameter_to_unary"]
    ratios["goals"] = {
        "throughput_at_least_unary": bool(unary["throughput"] and unary["throughput"] >= 1.0),
        "server_cpu_per_request_at_most_unary": bool(
            unary["server_cpu_per_request"] is not None
            and unary["server_cpu_per_request"] <= 1.0),
    }
    return ratios


def table(results: dict[str, Any]) -> str:
    lines = ["| phase | req/s | server CPU ms/req | Redis CPU ms/req | driver CPU ms/req | "
             "server CPU % | others CPU % | p50 ms | p99 ms | failures | Redis trips/req | "
             "in-script cmds/req | server reads/req | server writes/req |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in results["phases"].items():
        lines.append(f"| {name} | {p['requests_per_s']:,.0f} | "
                     f"{p['server_cpu_ms_per_request']:.3f} | "
                     f"{p['redis_cpu_ms_per_request']:.3f} | "
                     f"{p['driver_cpu_ms_per_request']:.3f} | {p['server_cpu_percent']:.0f} | "
                     f"{p['others_cpu_percent']:.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | "
                     f"{p['failures']} | {p['redis_round_trips_per_request']:.3f} | "
                     f"{p['in_script_commands_per_request']:.1f} | "
                     f"{p['server_reads_per_request']:.2f} | "
                     f"{p['server_writes_per_request']:.2f} |")
    lines += ["", "| transport, all rounds | req/s | server CPU ms/req | failures |",
              "|---|---|---|---|"]
    for name, t in results["totals"].items():
        lines.append(f"| {name} | {t['requests_per_s']:,.0f} | "
                     f"{t['server_cpu_ms_per_request']:.3f} | {t['failures']} |")
    lines += ["", "| ratio | throughput | server CPU per request |", "|---|---|---|"]
    for other in (UNARY, STREAM):
        r = results["ratios"][f"diameter_to_{other}"]
        lines.append(f"| Diameter / {other} | {r['throughput']} "
                     f"(rounds {', '.join(map(str, r['throughput_per_round']))}) | "
                     f"{r['server_cpu_per_request']} "
                     f"(rounds {', '.join(map(str, r['server_cpu_per_request_per_round']))}) |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started_at = datetime.datetime.now(datetime.UTC)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="creditline-dbench-") as tmp, \
            RedisProcess() as redis_process:
        port, diameter_port = free_port(), free_port()
        server = ServerProcess("creditline", [
            sys.executable, "-m", "creditline", "serve", "--redis-url", redis_process.url,
            "--listen-address", f"127.0.0.1:{port}", "--log-level", "WARNING",
            "--workers", "1", "--diameter-listen", f"127.0.0.1:{diameter_port}",
            "--diameter-identity-fallback", "data", *args.server_arg], port, Path(tmp))
        try:
            await server.wait_ready()
            async with _redis_client(redis_process.url) as redis:
                bench = DiameterBench(args, server, diameter_port, redis,
                                      redis_server_ps(redis_process.port))
                results = await _run_phases(bench)
                results["redis_server"] = (await redis.info("server"))["redis_version"]
        finally:
            code = server.stop()
            if code not in (0, -15):
                log.warning("server exited with %s: %s", code, server.log_tail())
    results.update(
        started_at=started_at.isoformat(timespec="seconds"),
        command=" ".join(["python -m bench.diameter_bench", *sys.argv[1:]]),
        machine={**_machine(), "load_average_at_start": [round(x, 2) for x in load_at_start]},
        arguments={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    return results


async def _run_phases(bench: DiameterBench) -> dict[str, Any]:
    args = bench.args
    async with grpc.aio.insecure_channel(bench.server.target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        charging = charging_pb2_grpc.ChargingStub(channel)
        diameter = await DiameterClient.connect(bench.diameter_port)
        try:
            cea = await diameter.exchange_capabilities()
            if cea != SUCCESS:
                raise RuntimeError(f"CER answered {cea}")
            await bench.open_sessions(admin, charging, diameter)
            streams = [StreamCalls(charging) for _ in range(args.streams)]
            stream_calls = [s.calls()["Update"] for s in streams]
            turn = itertools.count()

            async def unary(session: Session) -> list[int]:
                return _grpc_codes(await charging.Update(grpc_request(session),
                                                         timeout=CALL_TIMEOUT_S))

            async def streamed(session: Session) -> list[int]:
                call = stream_calls[next(turn) % len(stream_calls)]
                return _grpc_codes(await call(grpc_request(session), timeout=CALL_TIMEOUT_S))

            async def ccr_u(session: Session) -> list[int]:
                return await diameter.credit_control(session, 2)

            sends: dict[str, tuple[SendUpdate, list[Session]]] = {
                UNARY: (unary, bench.grpc_sessions), STREAM: (streamed, bench.grpc_sessions),
                DIAMETER: (ccr_u, bench.diameter_sessions)}
            for number in range(1, args.rounds + 1):
                for transport in PHASES:
                    send, sessions = sends[transport]
                    await bench.phase(f"{transport}_round{number}", send, sessions)
            for stream in streams:
                await stream.close()
            await bench.close_sessions(charging, diameter)
            books = await bench.check_books(admin)
        finally:
            diameter.close()
    totals = {t: _aggregate(bench.phases, t) for t in PHASES}
    return {
        "phases": bench.phases,
        "totals": totals,
        "ratios": _ratios(bench.phases, totals, args.rounds),
        "failures": sum(t["failures"] for t in totals.values()),
        "teardown_failures": bench.setup_failures,
        "books": books,
    }


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.diameter_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=bounded(0.1, 3600), default=8.0,
                        help="measured window of each phase (default 8)")
    parser.add_argument("--warmup-s", type=bounded(0, 600), default=1.0,
                        help="load before each window, not measured (default 1)")
    parser.add_argument("--rounds", type=int, choices=range(1, 11), default=2, metavar="1..10")
    parser.add_argument("--accounts", type=int, default=1000,
                        help="accounts; one gRPC and one Diameter session each (default 1000)")
    parser.add_argument("--in-flight", type=int, default=64,
                        help="requests outstanding in every phase (default 64)")
    parser.add_argument("--streams", type=int, default=4,
                        help="Charging.Stream calls of the stream phase, on one channel, "
                             "as bench/run.py's per process (default 4)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for `creditline serve` (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not 1 <= args.in_flight <= args.accounts:
        parser.error("--in-flight: 1..--accounts (a session has one request outstanding)")
    if args.streams < 1:
        parser.error("--streams: at least 1")
    args.tag = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_arguments(argv)
    import uvloop

    results = uvloop.run(run(args))
    json_path = write_results(args.out / f"diameter-{args.tag}.json", results)
    print(table(results))
    print(f"\nresults: {json_path}")
    print(f"books: {results['books']['mismatches']} of {results['books']['accounts']} "
          "accounts charged other than their reports' price")
    ok = not (results["failures"] or results["teardown_failures"]
              or results["books"]["mismatches"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
