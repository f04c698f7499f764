"""What tracing costs: throughput of Initial + Terminate with tracing off, with every call
traced (100% sampling) and with 1% sampling, as ratios to off.

    python bench/tracing_overhead.py [--sessions 1500] [--concurrency 64] [--rounds 3]

The server runs in this process (uvloop, as `creditline serve` runs it) against its own
redis-server; the client runs in a child process (this script with --client) with its own
event loop, so the two do not share one loop; it warms up before it measures. Spans go
through a BatchSpanProcessor, as in production, to an exporter that drops them: what is
measured is the span work on the call path, not an exporter's network. The modes are
interleaved over several rounds and each mode's median is reported, since one run on a
shared 2-core machine is noisy; each round starts with another mode. Goals: 100% >= 0.9 of off,
1% >= 0.97 of off.

    python bench/tracing_overhead.py --sections [--sessions 3000]

times the span path's steps inside the running server and in the tight in-process loop,
next to each other: where the end-to-end cost goes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import uvloop
from creditline.api import interceptors
from creditline.api.app import freeze_startup_objects, start_server, stop_server
from creditline.api.interceptors import CallWrapper
from creditline.charging.rating import IncrementRater, load_plan
from creditline.observability.telemetry import (
    CallSpanExporter,
    ScriptInstrument,
    SpanRecorder,
    Telemetry,
    TracedRater,
    sampler_from,
)
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

RG_VOICE = 100
CLIENT_TIMEOUT_S = 300
ACCOUNTS = 64
# The in-process loop of _tracing_work_us: calls measured, after calls to warm it up.
LOOP_CALLS = 5000
LOOP_WARMUP_CALLS = 200
# the samplers as the server builds them from OTEL_TRACES_SAMPLER(_ARG)
MODES: dict[str, Sampler | None] = {
    "off": None,
    "100%": sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}),
    "1%": sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
}


class PlainWorkSampler(Sampler):
    """Samples nothing, after `work_us` of plain Python work (a loop of additions, timed in
    a tight loop when made): with it the server pays that much per call and no tracing at
    all, so its ratio says what that much work per call costs end to end on this machine,
    the yardstick for the tracing work's own figure."""

    def __init__(self, work_us: float) -> None:
        probe = 200_000
        start_s = time.perf_counter()
        self._spin(probe)
        self._iterations = int(probe * work_us / ((time.perf_counter() - start_s) * 1e6))

    @staticmethod
    def _spin(iterations: int) -> int:
        total = 0
        for number in range(iterations):
            total += number
        return total

    def should_sample(self, *args: object, **kwargs: object) -> SamplingResult:
        self._spin(self._iterations)
        return SamplingResult(Decision.DROP)

    def get_description(self) -> str:
        return "PlainWorkSampler"


class DroppingExporter(SpanExporter):
    """Drops the spans it is given."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


class DroppingOtlpExporter(DroppingExporter):
    """Drops what an OTLP exporter would send, once written as it writes it: the server's
    call spans as one written request (export_encoded, as the server's OTLP exporters take
    them), other spans through the SDK's encoder."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        return super().export(spans)

    def export_encoded(self, request: bytes, calls: int) -> SpanExportResult:
        self.exported += calls
        return SpanExportResult.SUCCESS


def _telemetry(sampler: Sampler | None, max_queue_size: int = 2048,
               encode_otlp: bool = False) -> Telemetry:
    telemetry = Telemetry()
    if sampler is not None:
        exporter = DroppingOtlpExporter() if encode_otlp else DroppingExporter()
        telemetry.use_tracing(sampler, [exporter], max_queue_size=max_queue_size)
    return telemetry


async def _drive(target: str, run_id: str, sessions: int, concurrency: int) -> float:
    """Calls/s of `sessions` Initial + Terminate pairs, `concurrency` sessions at once."""
    async with grpc.aio.insecure_channel(target) as channel:
        charging = charging_pb2_grpc.ChargingStub(channel)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(sessions):
            queue.put_nowait(number)

        async def worker() -> None:
            while not queue.empty():
                number = queue.get_nowait()
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

        start_s = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return 2 * sessions / (time.perf_counter() - start_s)


async def _client(target: str, run_id: str, sessions: int, concurrency: int) -> float:
    await _drive(target, f"{run_id}-warm", concurrency, concurrency)  # connect, warm up
    return await _drive(target, run_id, sessions, concurrency)


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


async def _measure(settings: Settings, redis_url: str, sampler: Sampler | None, run_id: str,
                   sessions: int, concurrency: int, encode_otlp: bool = False) -> Run:
    running = await start_server(settings, redis_url, _telemetry(sampler,
                                                                 encode_otlp=encode_otlp),
                                 environ={})
    freeze_startup_objects()  # as `creditline serve` does once it has started
    target = f"127.0.0.1:{running.port}"
    try:
        await _accounts(target)
        cpu_start_s = time.process_time()
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", target, run_id, str(sessions),
            str(concurrency), stdout=asyncio.subprocess.PIPE)
        output, _ = await asyncio.wait_for(child.communicate(), CLIENT_TIMEOUT_S)
        cpu_s = time.process_time() - cpu_start_s
        if child.returncode != 0:
            raise RuntimeError(f"client failed with exit code {child.returncode}")
        calls = 2 * (sessions + concurrency)  # the warm-up and the measured calls
        return Run(float(output.decode().split()[-1]), cpu_s / calls * 1e6)
    finally:
        await stop_server(running, 1.0)
        gc.unfreeze()  # the next mode's server starts from the same state


class _Context:
    """The little of a grpc.aio ServicerContext the call wrapper reads."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK


@dataclass(frozen=True)
class _CallDetails:
    """What grpc shows the handler lookup of a call (grpc.HandlerCallDetails)."""

    method: str = "/creditline.v1.Charging/Initial"
    invocation_metadata: tuple[tuple[str, str], ...] = (("user-agent", "bench"),)


async def _tracing_work_us(sampler: Sampler | None, plan: Path, calls: int,
                           encode_otlp: bool = False) -> float:
    """Server CPU per call of what tracing adds, in this process without network or Redis:
    the call wrapper's call span, the rating span and the script span, around a handler
    that rates one tariff and awaits a finished script call."""
    # a queue for every span of the loop: a tight loop outruns the export thread, and
    # dropping spans would understate the cost
    telemetry = _telemetry(sampler, max_queue_size=4 * (calls + LOOP_WARMUP_CALLS),
                           encode_otlp=encode_otlp)
    rater = telemetry.traced_rater(IncrementRater())
    instrument = telemetry.script_instrument()
    tariff = load_plan(plan).tariff_for(RG_VOICE, None)
    assert tariff is not None
    answer = pb.CreditControlAnswer(result_code=pb.SUCCESS)

    async def script() -> str:
        return "answer"

    async def handler(request: pb.CreditControlRequest, context: object
                      ) -> pb.CreditControlAnswer:
        rater.rate_table(tariff, 0, 0, "")
        await (script() if instrument is None else instrument.run("charge.lua", script()))
        return answer

    call = handler
    see_call = None
    if telemetry.spans is not None:
        wrapper = CallWrapper(spans=telemetry.spans, metrics=None, check_roles=False)
        call = wrapper.wrap(_CallDetails.method,
                            grpc.unary_unary_rpc_method_handler(handler)).unary_unary
        see_call = wrapper.see_call
    request = pb.CreditControlRequest(
        session_id="s", account_id="a",
        rating_groups=[pb.RatingGroupRequest(rating_group=RG_VOICE)])
    context, details = _Context(), _CallDetails()
    for _ in range(LOOP_WARMUP_CALLS):
        await call(request, context)
    start_s = time.process_time()
    for _ in range(calls):
        if see_call is not None:
            see_call(details)  # grpc's handler lookup, each call
        await call(request, context)
    await telemetry.shutdown()  # the spans still queued are made and exported: counted too
    cpu_s = time.process_time() - start_s
    return cpu_s / calls * 1e6


# The span path's synchronous steps (no await inside: their wall time is their CPU time),
# timed where they run with --sections: (owner, attribute, what it does).
_SECTIONS: tuple[tuple[object, str, str], ...] = (
    (interceptors, "keep_trace_headers", "trace headers kept (at the handler lookup)"),
    (interceptors, "parent_context", "trace headers read"),
    (SpanRecorder, "start_call", "call span started (ids, sampler)"),
    (SpanRecorder, "enter", "made the current call"),
    (SpanRecorder, "leave", "current no more"),
    (SpanRecorder, "end_call", "call span ended, handed to the batch processor"),
    (CallSpanExporter, "_spans_of", "the 3 SDK spans made (in the export thread)"),
    (ScriptInstrument, "run", "script span started"),
    (TracedRater, "rate_table", "rating, with its child span"),
)


class _SectionTimer:
    """Time spent in each of _SECTIONS, and in garbage collection, while installed."""

    def __init__(self) -> None:
        self.total_ns: Counter[str] = Counter()
        self._gc_start_ns = 0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start_ns = time.perf_counter_ns()
        else:
            self.total_ns["garbage collection"] += time.perf_counter_ns() - self._gc_start_ns

    def install(self) -> Callable[[], None]:
        """Wraps every section in a timer; returns what unwraps them."""
        originals = [(owner, name, vars(owner)[name]) for owner, name, _ in _SECTIONS]
        for owner, name, label in _SECTIONS:
            original = vars(owner)[name]
            is_static = isinstance(original, staticmethod)
            timed = self._timed(original.__func__ if is_static else original, label)
            setattr(owner, name, staticmethod(timed) if is_static else timed)
        gc.callbacks.append(self._on_gc)

        def uninstall() -> None:
            gc.callbacks.remove(self._on_gc)
            for owner, name, original in originals:
                setattr(owner, name, original)
        return uninstall

    def _timed(self, function: Callable[..., object], label: str) -> Callable[..., object]:
        def timed(*args: object) -> object:
            start_ns = time.perf_counter_ns()
            try:
                return function(*args)
            finally:
                self.total_ns[label] += time.perf_counter_ns() - start_ns
        return timed


async def _sections(settings: Settings, redis_url: str, plan: Path, sessions: int,
                    concurrency: int) -> None:
    """The same steps timed in the running server and in the tight in-process loop."""
    labels = [label for _, _, label in _SECTIONS] + ["garbage collection"]
    for mode in ("off", "100%", "1%"):
        in_server, in_loop = _SectionTimer(), _SectionTimer()
        uninstall = in_server.install()
        try:
            run = await _measure(settings, redis_url, MODES[mode], f"sections-{mode}",
                                 sessions, concurrency)
        finally:
            uninstall()
        server_calls = 2 * (sessions + concurrency) + ACCOUNTS  # and the accounts made
        loop_calls = LOOP_CALLS + LOOP_WARMUP_CALLS
        uninstall = in_loop.install()
        try:
            await _tracing_work_us(MODES[mode], plan, LOOP_CALLS)
        finally:
            uninstall()
        print(f"\ntracing {mode}: us per call, in the server ({run.cpu_us_per_call:.0f} us "
              "CPU per call) and in the tight loop")
        for label in labels:
            print(f"  {in_server.total_ns[label] / server_calls / 1e3:7.2f} "
                  f"{in_loop.total_ns[label] / loop_calls / 1e3:7.2f}  {label}")


async def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--sessions", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain-work-us", type=float, default=0.0,
                        help="also run a mode with this much plain Python work per call "
                             "and no tracing: what that much work costs end to end here")
    parser.add_argument("--encode-otlp", action="store_true",
                        help="the exporter writes the spans as the server's OTLP exporters "
                             "do before sending, then drops them")
    parser.add_argument("--sections", action="store_true",
                        help="time the span path's steps in the server and in a tight loop")
    parser.add_argument("--client", nargs=4, metavar=("TARGET", "RUN", "SESSIONS", "AT_ONCE"),
                        help="(internal) be the load generator and print calls/s")
    args = parser.parse_args(argv)
    if args.client:
        target, run_id, sessions, concurrency = args.client
        print(await _client(target, run_id, int(sessions), int(concurrency)))
        return 0
    plan = DEFAULT_PLAN_PATH
    # a long Redis deadline: on a crowded machine a call may wait, but must not fail
    settings = replace(Settings(listen_address="127.0.0.1:0", plan_path=str(plan)),
                       redis_max_connections=64, redis_call_timeout_s=30.0)
    modes = dict(MODES)
    if args.plain_work_us > 0:
        modes[f"+{args.plain_work_us:g}us"] = PlainWorkSampler(args.plain_work_us)
    runs: dict[str, list[Run]] = {mode: [] for mode in modes}
    if args.sections:
        with RedisProcess() as redis:
            await _sections(settings, redis.url, plan, args.sessions, args.concurrency)
        return 0
    with RedisProcess() as redis:
        names = list(modes)
        for round_number in range(args.rounds):
            # each round starts with another mode: no mode always runs after the same one
            shift = round_number % len(names)
            for mode in names[shift:] + names[:shift]:
                run = await _measure(settings, redis.url, modes[mode],
                                     f"r{round_number}-{mode}", args.sessions,
                                     args.concurrency, args.encode_otlp)
                runs[mode].append(run)
                print(f"round {round_number + 1} {mode:>5}: {run.calls_per_s:8.0f} calls/s, "
                      f"server CPU {run.cpu_us_per_call:6.0f} us/call", flush=True)
    rate = {mode: statistics.median(r.calls_per_s for r in rs) for mode, rs in runs.items()}
    cpu = {mode: statistics.median(r.cpu_us_per_call for r in rs) for mode, rs in runs.items()}
    print(f"\nmedians of {args.rounds} rounds, {2 * args.sessions} calls each "
          f"(Initial + Terminate), {args.concurrency} sessions at once:")
    print("  throughput ratio = calls/s over off's (noisy where others share the cores);")
    print("  CPU ratio = off's server CPU per call over this mode's: the throughput ratio")
    print("  of a CPU-bound server, and steadier on a shared machine")
    goals = {"100%": 0.9, "1%": 0.97}
    for mode in modes:
        goal = f"  (goal >= {goals[mode]})" if mode in goals else ""
        print(f"  tracing {mode:>5}: {rate[mode]:7.0f} calls/s, ratio "
              f"{rate[mode] / rate['off']:.3f}; {cpu[mode]:5.0f} us CPU/call, ratio "
              f"{cpu['off'] / cpu[mode]:.3f}{goal}")
    # The machine's load drifts between rounds far more than within one (a round's three
    # runs follow each other): a round's own ratios cancel the drift, their median is the
    # steadier figure.
    print("  the same as the median of each round's own ratios (the steadier figure):")
    for mode in modes:
        goal = f"  (goal >= {goals[mode]})" if mode in goals else ""
        rounds = list(zip(runs[mode], runs["off"], strict=True))
        rate_ratio = statistics.median(run.calls_per_s / off.calls_per_s for run, off in rounds)
        cpu_ratio = statistics.median(off.cpu_us_per_call / run.cpu_us_per_call
                                      for run, off in rounds)
        print(f"  tracing {mode:>5}: calls/s ratio {rate_ratio:.3f}; CPU ratio "
              f"{cpu_ratio:.3f}{goal}")
    work = {mode: statistics.median([
        await _tracing_work_us(sampler, plan, LOOP_CALLS, args.encode_otlp) for _ in range(3)])
        for mode, sampler in modes.items()}
    print("\ntracing work alone (in process, no network, no Redis), CPU per call, and the")
    print(f"ratio it implies for a server spending off's {cpu['off']:.0f} us CPU per call")
    print("(a lower bound: in a tight loop the code stays in the CPU's caches; in the server")
    print("the same steps cost 2-4 times as much, see --sections):")
    for mode in modes:
        extra = max(0.0, work[mode] - work["off"])
        goal = f"  (goal >= {goals[mode]})" if mode in goals else ""
        print(f"  tracing {mode:>5}: {work[mode]:6.1f} us, +{extra:5.1f} us, ratio "
              f"{cpu['off'] / (cpu['off'] + extra):.3f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(uvloop.run(main(sys.argv[1:])))
