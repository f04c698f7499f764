"""What tracing costs: throughput with tracing off, 1 %, 10 % and 100 % sampled, as ratios.

Initial + Terminate calls, sampled by the SDK's TraceIdRatioBased behind ParentBased (as
OTEL_TRACES_SAMPLER=parentbased_traceidratio makes it), all modes in one run.

    python bench/tracing_overhead.py [--sessions 1500] [--concurrency 64] [--rounds 3]

The server runs in this process (uvloop, as `creditline serve` runs it) against its own
redis-server, on the standard path: the SDK's tracer and BatchSpanProcessor; the client
runs in a child process (this script with --client) with its own event loop, so the two do
not share one loop; it warms up before it measures. The exporter encodes each batch as the
server's OTLP exporter does (observability/otlp_traces.py's encoder) and drops it: what is
measured is the span work, not a collector's network. The modes are interleaved over
several rounds and each mode's median is reported, since one run on a shared machine is
noisy; each round starts with another mode. Goals: 1 % >= 0.98 of off, 10 % >= 0.95;
100 % reported. Then the tracing work alone, timed in a tight loop in this process: the
steady lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
import uvloop
from creditline.api.app import freeze_startup_objects, start_server, stop_server
from creditline.api.handlers import ByMetadata, Handler
from creditline.api.interceptors import CallWrapper
from creditline.observability.otlp_traces import SpanEncoder, select_span_encoder
from creditline.observability.telemetry import RootSampling, Telemetry, tracing_sampling
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Sampler

RG_VOICE = 100
SWEEP_INTERVAL_S = 24 * 3600.0  # (no sweep during a run: main says why)
CLIENT_TIMEOUT_S = 3600  # (under callgrind a run takes minutes)
ACCOUNTS = 64
# the sampling as OTEL_TRACES_SAMPLER=parentbased_traceidratio and _ARG make it in the
# server (telemetry.tracing_sampling: the SDK's sampler and the root sampling ahead of it)
MODES: dict[str, tuple[Sampler, RootSampling] | None] = {
    "off": None,
    **{f"{ratio:.0%}": tracing_sampling({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                         "OTEL_TRACES_SAMPLER_ARG": str(ratio)})
       for ratio in (0.01, 0.1, 1.0)},
}
GOALS = {"1%": 0.98, "10%": 0.95}
# --instructions also counts 0 %: every root drawn and left out, what a left-out call
# costs measured by itself, not solved from a mode's mix of sampled and left-out calls
LEFT_OUT_MODE = "0%"
INSTRUCTION_MODES = {"off": MODES["off"], LEFT_OUT_MODE: tracing_sampling(
    {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}),
    **{mode: sampling for mode, sampling in MODES.items() if mode != "off"}}


class EncodingExporter(SpanExporter):
    """Encodes each batch as the server's OTLP exporter does before sending it (with the
    same encoder), then drops it."""

    def __init__(self, encoder: SpanEncoder) -> None:
        self.exported = 0
        self._encoder = encoder

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._encoder.encode_spans(spans)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


Sampling = tuple[Sampler, RootSampling]


def _telemetry(sampling: Sampling | None, exporter: EncodingExporter | None = None
               ) -> Telemetry:
    telemetry = Telemetry()
    if sampling is not None:
        sampler, roots = sampling
        telemetry.use_tracing(
            sampler, [exporter or EncodingExporter(select_span_encoder(os.environ))],
            root_sampling=roots)
    return telemetry


async def _drive(target: str, run_id: str, sessions: int, concurrency: int,
                 rate: float = 0.0) -> float:
    """Calls/s of `sessions` Initial + Terminate pairs, `concurrency` sessions at once;
    with a rate, the sessions start at that many a second (0: as fast as they can)."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(target) as channel:
        charging = charging_pb2_grpc.ChargingStub(channel)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(sessions):
            queue.put_nowait(number)

        async def worker() -> None:
            while not queue.empty():
                number = queue.get_nowait()
                if rate:
                    await asyncio.sleep(max(0.0, start_s + number / rate - loop.time()))
                account_id = f"bench-{number % ACCOUNTS}"
                session_id = f"{run_id}-{number}"
                request = pb.CreditControlRequest(
                    session_id=session_id, account_id=account_id, request_number=0,
                    rating_groups=[pb.RatingGroupRequest(
                        rating_group=RG_VOICE, requested=pb.Units(time_s=60))])
                answer = await charging.Initial(request)
                assert answer.result_code == pb.SUCCESS, answer
                request.request_number = 1
                request.rating_groups[0].ClearField("requested")
                request.rating_groups[0].used.time_s = 30
                await charging.Terminate(request)

        start_s = loop.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return 2 * sessions / (loop.time() - start_s)


async def _client(target: str, run_id: str, sessions: int, concurrency: int,
                  rate: float) -> float:
    await _drive(target, f"{run_id}-warm", concurrency, concurrency)  # connect, warm up
    return await _drive(target, run_id, sessions, concurrency, rate)


async def _accounts(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for number in range(ACCOUNTS):
            try:
                await admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=f"bench-{number}", initial_balance_micros=10**15))
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.ALREADY_EXISTS:
                    raise


@dataclass
class Run:
    calls_per_s: float
    cpu_us_per_call: float  # this (server) process's CPU time, all its threads
    calls: int = 0  # the calls served, warm-up included
    spans: int = 0  # the spans exported (one per sampled call)


async def _measure(settings: Settings, redis_url: str, sampling: Sampling | None, run_id: str,
                   sessions: int, concurrency: int, rate: float = 0.0) -> Run:
    exporter = EncodingExporter(select_span_encoder(os.environ))
    running = await start_server(settings, redis_url, _telemetry(sampling, exporter),
                                 environ={})
    freeze_startup_objects()  # as `creditline serve` does once it has started
    target = f"127.0.0.1:{running.port}"
    try:
        await _accounts(target)
        cpu_start_s = time.process_time()
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", target, run_id, str(sessions),
            str(concurrency), str(rate), stdout=asyncio.subprocess.PIPE)
        output, _ = await asyncio.wait_for(child.communicate(), CLIENT_TIMEOUT_S)
        cpu_s = time.process_time() - cpu_start_s
        if child.returncode != 0:
            raise RuntimeError(f"client failed with exit code {child.returncode}")
        calls = 2 * (sessions + concurrency)  # the warm-up and the measured calls
        run = Run(float(output.decode().split()[-1]), cpu_s / calls * 1e6, calls)
    finally:
        await stop_server(running, 1.0)  # (its spans still queued are exported)
        gc.unfreeze()  # the next mode's server starts from the same state
    run.spans = exporter.exported
    return run


# The in-process loop of _tracing_work_us: calls measured, after calls to warm it up.
LOOP_CALLS = 20_000
LOOP_WARMUP_CALLS = 500


# A call's metadata, as the bench's client sends it.
_METADATA = (("user-agent", "bench"),)


class _Context:
    """The little of a grpc.aio ServicerContext the call wrapper reads."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return _METADATA


async def _tracing_work_us(sampling: Sampling | None) -> float:
    """Server CPU per call of what tracing adds, in this process without network or Redis:
    the call wrapper's span and the script's child span around a handler that awaits a
    finished script call, the spans exported (encoded) as they are in the server. A lower
    bound: in the server the same code runs out of the CPU's caches."""
    # a queue for every span of the loop (the BatchSpanProcessor reads its size from the
    # environment): a tight loop outruns the export thread, and dropped spans would
    # understate the cost
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(4 * (LOOP_CALLS + LOOP_WARMUP_CALLS))
    try:
        telemetry = _telemetry(sampling)
    finally:
        del os.environ["OTEL_BSP_MAX_QUEUE_SIZE"]
    instrument = telemetry.script_instrument()
    answer = pb.CreditControlAnswer(result_code=pb.SUCCESS)

    async def script() -> str:
        return "answer"

    async def handler(request: pb.CreditControlRequest, context: object
                      ) -> pb.CreditControlAnswer:
        await (script() if instrument is None else instrument.run("charge.lua", script()))
        return answer

    wrapped: Handler | ByMetadata = grpc.unary_unary_rpc_method_handler(handler)
    if telemetry.tracer is not None:
        wrapper = CallWrapper(tracer=telemetry.tracer, metrics=None, check_roles=False,
                              roots=telemetry.root_sampling)
        wrapped = wrapper.wrap("/creditline.v1.Charging/Initial", wrapped,
                               pb.CreditControlAnswer)

    async def call(request: pb.CreditControlRequest, context: _Context) -> None:
        # the handler looked up for each call, as grpc does (handlers._Methods.service)
        found = wrapped.for_call(_METADATA) if isinstance(wrapped, ByMetadata) else wrapped
        assert found.unary_unary is not None
        await found.unary_unary(request, context)

    request = pb.CreditControlRequest(session_id="s", account_id="a", rating_groups=[
        pb.RatingGroupRequest(rating_group=RG_VOICE)])
    context = _Context()
    for _ in range(LOOP_WARMUP_CALLS):
        await call(request, context)
    start_s = time.process_time()
    for _ in range(LOOP_CALLS):
        await call(request, context)
    await telemetry.shutdown()  # the spans still queued are exported: counted too
    return (time.process_time() - start_s) / LOOP_CALLS * 1e6


async def _rounds(settings: Settings, rounds: int, sessions: int, concurrency: int,
                  rate: float) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
    names = list(MODES)
    with RedisProcess() as redis:
        for round_number in range(rounds):
            # each round starts with another mode: no mode always runs after the same one
            shift = round_number % len(names)
            for mode in names[shift:] + names[:shift]:
                run = await _measure(settings, redis.url, MODES[mode],
                                     f"r{round_number}-{mode}", sessions, concurrency, rate)
                runs[mode].append(run)
                print(f"round {round_number + 1} {mode:>5}: {run.calls_per_s:8.0f} calls/s, "
                      f"server CPU {run.cpu_us_per_call:6.0f} us/call", flush=True)
    return runs


# --instructions: each mode's server counted twice, with --sessions and with
# INSTRUCTIONS_LONGER times as many; the difference is the calls' own (no start, no
# imports). Why 4x: the counts follow the timing of Redis replies and grpc batches, and two
# runs of the same mode and size differed by 2-4 million instructions (2026-12-08); over
# the 1,600 calls of 800 and 1,600 sessions that was +-1.5-2.7k a call, a left-out call's
# whole cost, over the 4,800 calls of 800 and 3,200 it is a third of that.
INSTRUCTIONS_LONGER = 4
INSTRUCTIONS_AT_ONCE = 2  # callgrind runs side by side (one per core)
# The BatchSpanProcessor's timer under callgrind: an hour, so that batches are sent when
# full (512 spans), as a server at speed sends them at 10 % (2,300 calls/s: 512 spans in
# ~2 s, before the 5 s timer). Why: ~50x slower, a 10 % run had its timer send ~14-span
# batches every 5 s; one pair of runs of 800 and 1,600 sessions counted 609k instructions
# a call with it, 581k with full batches (2026-12-08); much of what a later run still
# read beyond that was the noise of such short runs (INSTRUCTIONS_LONGER; bench/README.md,
# "Issue 19, the morning of 2026-12-08").
CALLGRIND_SCHEDULE_DELAY_MS = str(3600 * 1000)


@dataclass(frozen=True)
class Counted:
    """One run of a mode under callgrind: the server's instructions, calls and spans."""

    instructions: int
    calls: int
    spans: int


async def _server_instructions(mode: str, sessions: int, concurrency: int, out_dir: str
                               ) -> Counted:
    """The instructions the server process executed (all its threads) in one run of mode
    under callgrind (valgrind traces this process, not the client's or Redis's), and the
    calls and spans it made."""
    out_file = os.path.join(out_dir, f"{mode.strip('%')}-{sessions}.out")
    child = await asyncio.create_subprocess_exec(
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
        sys.executable, __file__, "--one-mode", mode, "--sessions", str(sessions),
        "--concurrency", str(concurrency),
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": CALLGRIND_SCHEDULE_DELAY_MS},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    output, errors = await asyncio.wait_for(child.communicate(), CLIENT_TIMEOUT_S)
    if child.returncode != 0:
        raise RuntimeError(f"{mode} under callgrind failed: {errors.decode()[-2000:]}")
    _, calls, _, spans = output.decode().split()[-4:]  # "calls N spans M"
    with open(out_file) as out:
        for line in out:
            if line.startswith(("summary:", "totals:")):
                return Counted(int(line.split()[1]), int(calls), int(spans))
    raise RuntimeError(f"{out_file}: no summary line")


async def _instructions(sessions: int, concurrency: int) -> None:
    """Instructions per call of each mode, and each mode's ratio to off: on a noisy
    machine the steady figure (callgrind counts nearly the same for the same work). Then
    each mode at exactly its share of sampled calls: the roots are drawn at random, so a
    run's share is off by chance (at 10 % over 4,800 calls, +-0.4 points, +-1k
    instructions a call); the run's count is moved by what the calls it sampled too many
    or too few cost more than left-out ones: a sampled call's cost is the 100 % run's, a
    left-out call's the 0 % run's."""
    longer = INSTRUCTIONS_LONGER * sessions
    at_once = asyncio.Semaphore(INSTRUCTIONS_AT_ONCE)
    with tempfile.TemporaryDirectory() as out_dir:
        async def counted(mode: str, count: int) -> Counted:
            async with at_once:
                return await _server_instructions(mode, count, concurrency, out_dir)

        # (a mode's two runs side by side, each on a core: they share the machine's state)
        runs = {mode: asyncio.gather(counted(mode, sessions), counted(mode, longer))
                for mode in INSTRUCTION_MODES}
        results = dict(zip(runs, await asyncio.gather(*runs.values()), strict=True))
    per_call = {mode: (bigger.instructions - smaller.instructions) / (bigger.calls - smaller.calls)
                for mode, (smaller, bigger) in results.items()}
    shares = {mode: (bigger.spans - smaller.spans) / (bigger.calls - smaller.calls)
              for mode, (smaller, bigger) in results.items()}
    print(f"server instructions per call (callgrind; runs of {sessions} and {longer} "
          f"sessions, the difference over their calls):")
    off = per_call["off"]
    sampled = per_call["100%"] - off  # what a sampled call adds
    left_out = per_call[LEFT_OUT_MODE] - off  # what a left-out call adds
    print(f"  a sampled call +{sampled:,.0f}, a left-out call +{left_out:,.0f}")
    for mode, instructions in per_call.items():
        goal = f"  (goal >= {GOALS[mode]})" if mode in GOALS else ""
        line = (f"  tracing {mode:>5}: {instructions:10,.0f}, ratio {off / instructions:.3f}"
                f"; sampled {shares[mode]:6.1%} of calls")
        sampling = INSTRUCTION_MODES[mode]
        share = sampling[1].ratio if sampling is not None else None  # (the mode's own)
        if share is not None and 0.0 < share < 1.0:
            exact = instructions + (share - shares[mode]) * (sampled - left_out)
            line += f"; at exactly {share:.0%}: {exact:10,.0f}, ratio {off / exact:.3f}"
        print(line + goal)


def _report(runs: dict[str, list[Run]]) -> None:
    """Each mode's ratios to off: of the medians, and the median of each round's own
    ratios (the machine's load drifts between rounds far more than within one: a round's
    own ratios cancel the drift, the steadier figure)."""
    rate = {mode: statistics.median(r.calls_per_s for r in rs) for mode, rs in runs.items()}
    cpu = {mode: statistics.median(r.cpu_us_per_call for r in rs) for mode, rs in runs.items()}
    print("\nthroughput ratio = calls/s over off's; CPU ratio = off's server CPU per call "
          "over this mode's\n(the throughput ratio of a CPU-bound server, steadier on a "
          "shared machine)")
    for mode in runs:
        goal = f"  (goal >= {GOALS[mode]})" if mode in GOALS else ""
        rounds = list(zip(runs[mode], runs["off"], strict=True))
        rate_ratio = statistics.median(run.calls_per_s / off.calls_per_s for run, off in rounds)
        cpu_ratio = statistics.median(off.cpu_us_per_call / run.cpu_us_per_call
                                      for run, off in rounds)
        print(f"  tracing {mode:>5}: {rate[mode]:7.0f} calls/s, {cpu[mode]:5.0f} us CPU/call; "
              f"medians' ratios {rate[mode] / rate['off']:.3f} / {cpu['off'] / cpu[mode]:.3f}; "
              f"rounds' ratios {rate_ratio:.3f} / {cpu_ratio:.3f}{goal}")


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sessions", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instructions", action="store_true",
                        help="count the server's instructions per call under callgrind")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="sessions started per second (0: as fast as the server takes "
                             "them); below saturation the CPU per call is steadier")
    parser.add_argument("--client", nargs=5,
                        metavar=("TARGET", "RUN", "SESSIONS", "AT_ONCE", "RATE"),
                        help="(internal) be the load generator and print calls/s")
    parser.add_argument("--one-mode", choices=list(INSTRUCTION_MODES),
                        help="(internal) serve one run of this mode (under callgrind)")
    args = parser.parse_args(argv)
    if args.client:
        target, run_id, sessions, concurrency, rate = args.client
        print(await _client(target, run_id, int(sessions), int(concurrency), float(rate)))
        return 0
    if args.instructions:
        await _instructions(args.sessions, args.concurrency)
        return 0
    # a long Redis deadline: on a crowded machine a call may wait, but must not fail;
    # no sweeps (supervision, renewals: 2 x 16 partitions' Redis calls every second) while
    # it is measured: their work goes by the clock, not by the calls, and under callgrind,
    # ~50x slower, a run's sweeps added ~20k instructions to each call (off: 588k -> 568k,
    # 2026-12-07), more the longer a mode's run
    settings = replace(Settings(listen_address="127.0.0.1:0", plan_path=str(DEFAULT_PLAN_PATH)),
                       redis_max_connections=64, redis_call_timeout_s=30.0,
                       supervision_interval_s=SWEEP_INTERVAL_S,
                       renewal_interval_s=SWEEP_INTERVAL_S)
    if args.one_mode:
        with RedisProcess() as redis:
            run = await _measure(settings, redis.url, INSTRUCTION_MODES[args.one_mode], "one",
                                 args.sessions, args.concurrency)
        print(f"calls {run.calls} spans {run.spans}")
        return 0
    runs = await _rounds(settings, args.rounds, args.sessions, args.concurrency, args.rate)
    print(f"\nmedians of {args.rounds} rounds, {2 * args.sessions} calls each "
          f"(Initial + Terminate), {args.concurrency} sessions at once:")
    _report(runs)
    off_us = statistics.median(run.cpu_us_per_call for run in runs["off"])
    print("\ntracing work alone (in process, no network, no Redis), CPU per call, and the "
          f"ratio it implies\nfor a server spending off's {off_us:.0f} us CPU per call "
          "(a lower bound):")
    work = {mode: statistics.median([await _tracing_work_us(sampling) for _ in range(3)])
            for mode, sampling in MODES.items()}
    for mode in MODES:
        extra = max(0.0, work[mode] - work["off"])
        print(f"  tracing {mode:>5}: {work[mode]:6.1f} us, +{extra:5.1f} us, ratio "
              f"{off_us / (off_us + extra):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main(sys.argv[1:])))
