"""The asyncio load driver: session flows (Initial, Updates, Terminate) mixed with events,
closed loop (N flows in flight, for saturation) or open loop (requests started at a fixed
offered rate whatever the answers do, for latency at a given load).

Several processes, each with its own loop and channel(s), when one Python process cannot
drive the server hard enough. Every answer is counted with its result code, every failed
call with its gRPC status: nothing is dropped from the figures silently.

Two transports (`transport`): unary RPCs (one call per request), or Charging.Stream, the
bidirectional stream a gateway multiplexes its sessions over: `streams_per_process`
streams per process (spread over its channels), each carrying many flows at once, answers
matched to requests by correlation id. The flows and the requests are the same.

Latency is timed with time.perf_counter: uvloop's clock() moves in whole milliseconds.
In the open loop, each request has two latencies: from when it was sent (the service
latency, per method) and from when it was due (`from_due`), so a driver or a server that
falls behind shows up as latency instead of hiding it (coordinated omission). The second
includes the loop's timer resolution (up to 1 ms late wake-ups).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any

import grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc
from google.protobuf.message import Message

from bench.histogram import LatencyHistogram
from bench.stream_calls import CallFailedError, StreamCalls
from bench.workload import (
    EVENT,
    INITIAL,
    METHODS,
    TERMINATE,
    Workload,
    event_request,
    session_id,
    session_requests,
)

CLOSED_LOOP = "closed"
OPEN_LOOP = "open"
UNARY = "unary"
STREAM = "stream"
# Bounds: a phase longer than a day or more flows than this is a typo, not a benchmark.
MAX_DURATION_S = 24 * 3600.0
MAX_CONCURRENCY = 100_000
MAX_PROCESSES = 64
# How long a driver process may take to connect before the phase fails.
CONNECT_TIMEOUT_S = 20.0
# Spawned processes import grpc and protobuf: give them this long before the common start.
PROCESS_START_ALLOWANCE_S = 5.0

Call = Callable[..., Awaitable[Any]]
clock = time.perf_counter


@dataclass(frozen=True, slots=True)
class DriverConfig:
    target: str                      # host:port of the Charging service
    mode: str = CLOSED_LOOP
    duration_s: float = 10.0         # the measured window
    warmup_s: float = 1.0            # load before the window, not measured
    concurrency: int = 64            # closed loop: flows in flight, all processes together
    rate_rps: float = 0.0            # open loop: offered requests/s, all processes together
    processes: int = 1
    channels_per_process: int = 1
    transport: str = UNARY
    # transport STREAM: Charging.Stream calls per process, flows spread over them
    streams_per_process: int = 4
    # open loop, per process: a request due while this many are unanswered is not sent
    # but counted as shed (the server is past saturation; the queue must stay bounded)
    max_in_flight: int = 2_000
    call_timeout_s: float = 5.0
    run_tag: str = "run"
    seed: int = 1
    workload: Workload = field(default_factory=Workload)

    def __post_init__(self) -> None:
        if self.mode not in (CLOSED_LOOP, OPEN_LOOP):
            raise ValueError(f"mode: {self.mode!r} is not {CLOSED_LOOP!r} or {OPEN_LOOP!r}")
        if not 0 < self.duration_s <= MAX_DURATION_S or not 0 <= self.warmup_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s and warmup_s: at most {MAX_DURATION_S} s")
        if not 1 <= self.processes <= MAX_PROCESSES or self.channels_per_process < 1:
            raise ValueError(f"processes: 1..{MAX_PROCESSES}; channels_per_process: >= 1")
        if self.mode == CLOSED_LOOP and not self.processes <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency: processes..{MAX_CONCURRENCY} in a closed loop")
        if self.mode == OPEN_LOOP and self.rate_rps <= 0:
            raise ValueError("rate_rps: must be > 0 in an open loop")
        if self.transport not in (UNARY, STREAM) or self.streams_per_process < 1:
            raise ValueError(f"transport: {UNARY!r} or {STREAM!r}; streams_per_process >= 1")
        if self.max_in_flight < 1 or self.call_timeout_s <= 0:
            raise ValueError("max_in_flight and call_timeout_s: must be > 0")


@dataclass
class DriverResult:
    mode: str
    duration_s: float
    offered_rps: float
    processes: int
    # service latency (request sent -> answer) in the measured window, per method
    histograms: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {m: LatencyHistogram() for m in METHODS})
    # open loop: due -> answer, all methods (includes waiting for the driver's loop)
    from_due: LatencyHistogram = field(default_factory=LatencyHistogram)
    # answers in the measured window, per method and result code
    result_codes: dict[str, dict[int, int]] = field(
        default_factory=lambda: {m: {} for m in METHODS})
    # failed calls ("<method>:<gRPC status>"), warm-up and drain included
    errors: dict[str, int] = field(default_factory=dict)
    # every answered request, warm-up and drain included: the denominator of Redis
    # round trips per request (Redis counts those too)
    requests_total: int = 0
    # the same per method: an Initial and a Terminate cost Redis a second script call
    # each (the session id's claim, taken and given back)
    totals: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METHODS})
    shed: int = 0
    late_start_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(h.count for h in self.histograms.values())

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.duration_s

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def success_count(self) -> int:
        return sum(codes.get(pb.SUCCESS, 0) for codes in self.result_codes.values())

    def overall(self) -> LatencyHistogram:
        merged = LatencyHistogram()
        for histogram in self.histograms.values():
            merged.merge(histogram)
        return merged

    def merge(self, other: DriverResult) -> None:
        for method in METHODS:
            self.histograms[method].merge(other.histograms[method])
            codes = self.result_codes[method]
            for code, count in other.result_codes[method].items():
                codes[code] = codes.get(code, 0) + count
        self.from_due.merge(other.from_due)
        for reason, count in other.errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + count
        self.requests_total += other.requests_total
        for method, count in other.totals.items():
            self.totals[method] += count
        self.shed += other.shed
        self.late_start_s = max(self.late_start_s, other.late_start_s)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "processes": self.processes,
            "duration_s": self.duration_s,
            "offered_rps": round(self.offered_rps, 1),
            "throughput_rps": round(self.throughput_rps, 1),
            "requests": self.requests,
            "successes": self.success_count(),
            "requests_total": self.requests_total,
            "errors": self.error_count,
            "errors_by_kind": dict(self.errors),
            "shed": self.shed,
            "late_start_s": round(self.late_start_s, 3),
            "result_codes": {m: {str(c): n for c, n in sorted(codes.items())}
                             for m, codes in self.result_codes.items()},
            "latency": {"all": self.overall().summary(),
                        **{m: h.summary() for m, h in self.histograms.items()}},
            "latency_from_due": self.from_due.summary() if self.from_due.count else None,
        }


class _Recorder:
    """Counts one process's answers; latencies only inside the measured window."""

    def __init__(self, result: DriverResult, window_start: float, window_end: float) -> None:
        self._result = result
        self._window_start = window_start
        self._window_end = window_end

    def answered(self, method: str, stamp: float, latency_s: float, code: int,
                 from_due_s: float | None = None) -> None:
        result = self._result
        result.requests_total += 1
        result.totals[method] += 1
        if self._window_start <= stamp < self._window_end:
            result.histograms[method].record_s(latency_s)
            if from_due_s is not None:
                result.from_due.record_s(from_due_s)
            codes = result.result_codes[method]
            codes[code] = codes.get(code, 0) + 1

    def failed(self, method: str, reason: str) -> None:
        key = f"{method}:{reason}"
        self._result.errors[key] = self._result.errors.get(key, 0) + 1


def _calls(channel: grpc.aio.Channel) -> dict[str, Call]:
    stub = charging_pb2_grpc.ChargingStub(channel)
    return {"Initial": stub.Initial, "Update": stub.Update, "Terminate": stub.Terminate,
            "Event": stub.Event}


async def _call(calls: dict[str, Call], method: str, request: Message, timeout_s: float,
                recorder: _Recorder) -> int | None:
    """The answer's result code, or None when the call failed (counted as an error)."""
    try:
        answer = await calls[method](request, timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        recorder.failed(method, error.code().name)
        return None
    except CallFailedError as error:
        recorder.failed(method, error.code)
        return None
    code: int = answer.result_code
    return code


class _Flows:
    """Session ids, accounts and the random mix of one driver process."""

    def __init__(self, config: DriverConfig, process_index: int) -> None:
        self.workload = config.workload
        self.rng = random.Random(config.seed * 1_000 + process_index)
        self._source = f"gw{process_index}"
        self._run_tag = config.run_tag
        self._numbers = itertools.count()

    def new_session(self) -> list[tuple[str, pb.CreditControlRequest]]:
        sid = session_id(self._source, self._run_tag, next(self._numbers))
        return session_requests(sid, self.workload.pick_account(self.rng),
                                self.workload.updates_per_session)

    def new_event(self) -> pb.EventRequest:
        sid = session_id(self._source, self._run_tag, next(self._numbers))
        return event_request(sid, self.workload.pick_account(self.rng))


async def _closed_loop(config: DriverConfig, flows: _Flows, channels: list[dict[str, Call]],
                       recorder: _Recorder, concurrency: int, stop_at: float) -> None:
    event_share = config.workload.event_flow_share
    timeout_s = config.call_timeout_s

    async def one(calls: dict[str, Call], method: str, request: Message) -> int | None:
        started = clock()
        code = await _call(calls, method, request, timeout_s, recorder)
        if code is not None:
            finished = clock()
            recorder.answered(method, finished, finished - started, code)
        return code

    async def worker(calls: dict[str, Call]) -> None:
        # A flow started before stop_at runs to its Terminate, so no session is left open.
        while clock() < stop_at:
            if flows.rng.random() < event_share:
                await one(calls, EVENT, flows.new_event())
                continue
            for method, request in flows.new_session():
                code = await one(calls, method, request)
                if code is None or (method == INITIAL and code != pb.SUCCESS):
                    break  # no session to go on with; counted above

    await asyncio.gather(*(worker(channels[i % len(channels)]) for i in range(concurrency)))


@dataclass
class _OpenSession:
    calls: dict[str, Call]
    requests: list[tuple[str, pb.CreditControlRequest]]
    position: int = 0


async def _open_loop(config: DriverConfig, flows: _Flows, channels: list[dict[str, Call]],
                     recorder: _Recorder, rate_rps: float, start: float, stop_at: float,
                     result: DriverResult) -> None:
    """Requests are due at Poisson arrival times. Each due request is an Event (by the
    event share) or the next step of a session whose previous answer has arrived; a new
    session is opened when none is ready."""
    loop = asyncio.get_running_loop()
    ready: deque[_OpenSession] = deque()
    in_flight: set[asyncio.Task[None]] = set()
    event_share = config.workload.event_request_share
    timeout_s = config.call_timeout_s
    channel_turn = itertools.cycle(channels)

    async def send(calls: dict[str, Call], method: str, request: Message, due: float,
                   session: _OpenSession | None) -> None:
        sent = clock()
        code = await _call(calls, method, request, timeout_s, recorder)
        if code is None:
            return  # counted as an error; the session is abandoned
        answered = clock()
        recorder.answered(method, due, answered - sent, code, answered - due)
        if session is None or session.position >= len(session.requests):
            return
        if method == INITIAL and code != pb.SUCCESS:
            return
        ready.append(session)

    def dispatch(due: float) -> None:
        if len(in_flight) >= config.max_in_flight:
            result.shed += 1
            return
        if flows.rng.random() < event_share:
            calls = next(channel_turn)
            coroutine = send(calls, EVENT, flows.new_event(), due, None)
        else:
            session = ready.popleft() if ready else _OpenSession(
                next(channel_turn), flows.new_session())
            method, request = session.requests[session.position]
            session.position += 1
            coroutine = send(session.calls, method, request, due, session)
        task = loop.create_task(coroutine)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    due = start
    while due < stop_at:
        now = clock()
        while due <= now and due < stop_at:
            dispatch(due)
            due += flows.rng.expovariate(rate_rps)
        await asyncio.sleep(max(0.0, due - clock()))
    await _close_open_sessions(ready, in_flight, recorder, timeout_s)


async def _close_open_sessions(ready: deque[_OpenSession], in_flight: set[asyncio.Task[None]],
                               recorder: _Recorder, timeout_s: float) -> None:
    """After the window: let calls in flight finish, then Terminate every session that is
    still open so that the next phase starts from the same Redis state. Bounded by the
    number of sessions and one call deadline per round."""
    rounds = 0
    while (in_flight or ready) and rounds < 4:
        rounds += 1
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=timeout_s + 1.0)
        closing = []
        while ready:
            session = ready.popleft()
            _, last = session.requests[-1]
            terminate = pb.CreditControlRequest()
            terminate.CopyFrom(last)
            terminate.request_number = session.position
            closing.append(_call(session.calls, TERMINATE, terminate, timeout_s, recorder))
        for code in await asyncio.gather(*closing):
            if code is not None:
                recorder.answered(TERMINATE, math.inf, 0.0, code)


def _share(total: float, parts: int, index: int) -> int:
    base, extra = divmod(int(total), parts)
    return base + (1 if index < extra else 0)


async def drive(config: DriverConfig, process_index: int = 0,
                start_at_unix_s: float | None = None) -> DriverResult:
    """One driver process's share of the load (in the running event loop)."""
    result = DriverResult(config.mode, config.duration_s,
                          config.rate_rps / config.processes, 1)
    streams: list[StreamCalls] = []
    channels = [grpc.aio.insecure_channel(
        config.target,
        # a channel of its own per connection: the default global subchannel pool would
        # share one HTTP/2 connection between the channels of a process
        options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(config.channels_per_process)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                               CONNECT_TIMEOUT_S)
        # the streams open before the start, as a gateway's stay open
        if config.transport == STREAM:
            streams = [StreamCalls(charging_pb2_grpc.ChargingStub(channels[i % len(channels)]))
                       for i in range(config.streams_per_process)]
            calls = [stream.calls() for stream in streams]
        else:
            calls = [_calls(c) for c in channels]
        if start_at_unix_s is not None:
            delay_s = start_at_unix_s - time.time()
            result.late_start_s = max(0.0, -delay_s)
            await asyncio.sleep(max(0.0, delay_s))
        start = clock()
        window_start = start + config.warmup_s
        stop_at = window_start + config.duration_s
        recorder = _Recorder(result, window_start, stop_at)
        flows = _Flows(config, process_index)
        if config.mode == CLOSED_LOOP:
            concurrency = _share(config.concurrency, config.processes, process_index)
            await _closed_loop(config, flows, calls, recorder, concurrency, stop_at)
        else:
            await _open_loop(config, flows, calls, recorder, config.rate_rps / config.processes,
                             start, stop_at, result)
    finally:
        # the streams first: the server answers what they carry before they end
        await asyncio.gather(*(stream.close() for stream in streams))
        for channel in channels:
            await channel.close(grace=None)
    return result


def _process_main(config: DriverConfig, process_index: int, start_at_unix_s: float
                  ) -> DriverResult:
    import uvloop

    return uvloop.run(drive(config, process_index, start_at_unix_s))


def run_processes(config: DriverConfig, start_at_unix_s: float | None = None) -> DriverResult:
    """Runs the load in config.processes fresh processes (spawned: grpc does not survive a
    fork) that start together at start_at_unix_s (default: in PROCESS_START_ALLOWANCE_S),
    and merges their results. Blocks until they are done."""
    if start_at_unix_s is None:
        start_at_unix_s = time.time() + PROCESS_START_ALLOWANCE_S
    context = get_context("spawn")
    with ProcessPoolExecutor(config.processes, mp_context=context) as pool:
        futures = [pool.submit(_process_main, config, index, start_at_unix_s)
                   for index in range(config.processes)]
        results = [future.result() for future in futures]
    merged = DriverResult(config.mode, config.duration_s, config.rate_rps, config.processes)
    for part in results:
        merged.merge(part)
    return merged


def with_changes(config: DriverConfig, **changes: Any) -> DriverConfig:
    return replace(config, **changes)


__all__ = ["CLOSED_LOOP", "OPEN_LOOP", "STREAM", "UNARY", "DriverConfig", "DriverResult", "drive",
           "run_processes", "with_changes"]
