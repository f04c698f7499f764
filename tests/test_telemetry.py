"""Traces, metrics and logs, read from in-memory exporters and a real scrape endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, _call_wrapper, start_server, stop_server
from creditline.observability.logging_setup import JsonFormatter, TraceIdFilter
from creditline.observability.telemetry import (
    StandardSampler,
    Telemetry,
    TelemetryError,
    build_telemetry,
    sampler_from,
)
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags

from tests.books import Books
from tests.conftest import settings_with
from tests.messages import RG_FREE, RG_VOICE, block, ccr

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@dataclass
class Observed:
    running: RunningServer
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    charging: charging_pb2_grpc.ChargingStub
    admin: admin_pb2_grpc.AdminStub


@pytest.fixture(scope="module")
async def observed(redis_process: RedisProcess, settings: Settings
                   ) -> AsyncIterator[Observed]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    # the sampler the server builds by default (parentbased_always_on)
    telemetry = build_telemetry(settings, {}, span_exporter=spans, metric_reader=reader)
    running = await start_server(settings, redis_process.url, telemetry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Observed(running, spans, reader, charging_pb2_grpc.ChargingStub(channel),
                       admin_pb2_grpc.AdminStub(channel))
    await stop_server(running, grace_s=1.0)


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def _account(observed: Observed, books: Books, balance_micros: int = 5_000_000) -> str:
    """A new account, whose books are checked after the test."""
    account_id = f"tel{os.getpid()}-{uuid.uuid4().hex[:12]}"
    books.track(account_id)
    await observed.admin.CreateAccount(admin_pb.CreateAccountRequest(
        account_id=account_id, initial_balance_micros=balance_micros))
    return account_id


async def test_a_span_per_call_continuing_the_callers_trace(observed: Observed,
                                                           checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    observed.spans.clear()
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
    answer = await observed.charging.Initial(
        ccr("trace-1", account_id, 0, block(RG_VOICE, requested=60), block(RG_FREE)),
        metadata=(("traceparent", traceparent),))
    assert answer.result_code == pb.SUCCESS
    spans = observed.spans.get_finished_spans()
    [rpc] = _by_name(spans, "creditline.v1.Charging/Initial")
    assert rpc.kind is SpanKind.SERVER
    assert format(rpc.context.trace_id, "032x") == TRACE_ID
    assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == PARENT_SPAN_ID
    attributes = dict(rpc.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "creditline.v1.Charging"
    assert attributes["rpc.method"] == "Initial"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["creditline.account_id"] == account_id
    assert attributes["creditline.session_id"] == "trace-1"
    assert list(attributes["creditline.rating_groups"]) == [RG_VOICE, RG_FREE]  # type: ignore[arg-type]
    assert attributes["creditline.result_code"] == pb.SUCCESS
    # children: the rating of the voice tariff (the free one needs none) and the script
    [rating] = _by_name(spans, "rating")
    # (FCALL where Redis has functions, else EVALSHA)
    [script] = _by_name(spans, f"{observed.running.store.charge_operation} charge.lua")
    for child in (rating, script):
        assert child.parent is not None and child.parent.span_id == rpc.context.span_id
        assert child.context.trace_id == rpc.context.trace_id
    assert (rating.attributes or {})["creditline.rating_group"] == RG_VOICE
    assert script.kind is SpanKind.CLIENT
    assert (script.attributes or {})["db.system.name"] == "redis"


async def test_a_new_trace_without_trace_context(observed: Observed,
                                                checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    observed.spans.clear()
    await observed.charging.Initial(ccr("trace-2", account_id, 0, block(RG_VOICE, requested=1)))
    [rpc] = _by_name(observed.spans.get_finished_spans(), "creditline.v1.Charging/Initial")
    assert rpc.parent is None and format(rpc.context.trace_id, "032x") != TRACE_ID


async def test_concurrent_calls_each_continue_their_own_callers_trace(
        observed: Observed, checked_books: Books) -> None:
    # the trace headers are kept per call as grpc looks its handler up: calls in flight at
    # once, with and without headers, sampled or not by their callers, never mix them up
    account_id = await _account(observed, checked_books, balance_micros=100_000_000)
    observed.spans.clear()
    parents = {f"mix-{n}": (f"{n + 1:032x}", f"{n + 1:016x}", n % 3) for n in range(30)}

    async def initial(session: str, parent_kind: int) -> None:
        trace_id, span_id = parents[session][:2]
        metadata = {0: (), 1: (("traceparent", f"00-{trace_id}-{span_id}-01"),),
                    2: (("traceparent", f"00-{trace_id}-{span_id}-00"),)}[parent_kind]
        answer = await observed.charging.Initial(
            ccr(session, account_id, 0, block(RG_VOICE, requested=1)), metadata=metadata)
        assert answer.result_code == pb.SUCCESS

    await asyncio.gather(*(initial(session, kind) for session, (_, _, kind) in parents.items()))
    calls = {dict(span.attributes or {})["creditline.session_id"]: span
             for span in _by_name(observed.spans.get_finished_spans(),
                                  "creditline.v1.Charging/Initial")}
    # a caller that did not sample its trace gets no span; the others one each
    assert set(calls) == {session for session, (_, _, kind) in parents.items() if kind != 2}
    for session, span in calls.items():
        trace_id, span_id, kind = parents[session]
        if kind == 1:
            assert format(span.context.trace_id, "032x") == trace_id
            assert span.parent is not None and format(span.parent.span_id, "016x") == span_id
        else:
            assert span.parent is None
            assert format(span.context.trace_id, "032x") not in {t for t, _, _ in
                                                                 parents.values()}


async def test_a_refused_admin_call_is_an_error_span(observed: Observed) -> None:
    observed.spans.clear()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await observed.admin.GetAccount(admin_pb.GetAccountRequest(account_id="nobody-x"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    [rpc] = _by_name(observed.spans.get_finished_spans(), "creditline.v1.Admin/GetAccount")
    assert rpc.status.status_code is StatusCode.ERROR
    assert (rpc.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [point for resource in data.resource_metrics for scope in resource.scope_metrics
            for metric in scope.metrics if metric.name == name
            for point in metric.data.data_points]


async def test_metrics_count_calls_units_money_and_redis_latency(observed: Observed,
                                                                checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    await observed.charging.Initial(ccr("metrics-1", account_id, 0, block(RG_VOICE, requested=60)))
    await observed.charging.Terminate(ccr("metrics-1", account_id, 1, block(RG_VOICE, used=60)))
    requests = _points(observed.metrics, "creditline.rpc.requests")
    initial = [p for p in requests if p.attributes["rpc.method"] == "Initial"
               and p.attributes["creditline.result_code"] == pb.SUCCESS]
    assert initial and initial[0].value >= 1
    assert any(p.attributes["rpc.method"] == "CreateAccount" for p in requests)
    durations = _points(observed.metrics, "rpc.server.call.duration")
    assert sum(p.count for p in durations if p.attributes["rpc.method"] == "Terminate") >= 1
    granted = _points(observed.metrics, "creditline.units.granted")
    assert any(p.attributes == {"creditline.rating_group": RG_VOICE, "creditline.unit": "time_s"}
               and p.value >= 60 for p in granted)
    charged = _points(observed.metrics, "creditline.charged")
    assert sum(p.value for p in charged) >= 700_000  # connect fee + first minute
    redis = _points(observed.metrics, "creditline.redis.script.duration")
    assert {p.attributes["creditline.script"] for p in redis} >= {"charge.lua", "admin.lua"}


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


async def test_prometheus_endpoint_serves_the_metrics(
        redis_process: RedisProcess, settings: Settings) -> None:
    running = await start_server(
        settings_with(settings, metrics_listen_address="127.0.0.1:0",
                      metrics_accounts_interval_s=0.05), redis_process.url, environ={})
    try:
        assert running.telemetry.tracer is None  # metrics only
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await admin.GetAccount(admin_pb.GetAccountRequest(account_id="nobody-y"))
        url = f"http://127.0.0.1:{running.telemetry.prometheus_port}/metrics"
        text = await asyncio.to_thread(_scrape, url)
        assert "creditline_rpc_requests" in text and 'rpc_method="GetAccount"' in text
        assert "rpc_server_call_duration" in text
        deadline = time.monotonic() + 10
        while "creditline_accounts" not in text or "creditline_cdr_backlog" not in text:
            # the first count may still be running
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
            text = await asyncio.to_thread(_scrape, url)
        # the CDR backlog: the CDR streams' lengths (the session Redis holds unexported CDRs)
        backlog = sum([await running.redis.xlen(f"cl:{{{p}}}:cdrs")  # type: ignore[misc]
                       for p in range(settings.partitions)])
        lines = [line for line in text.splitlines() if line.startswith("creditline_cdr_backlog")]
        assert lines and float(lines[0].split()[-1]) >= min(backlog, 1), text
    finally:
        await stop_server(running, grace_s=1.0)


def test_telemetry_is_off_by_default_and_costs_no_call_wrapper() -> None:
    telemetry = build_telemetry(Settings(), {})
    assert telemetry.tracer is None and telemetry.metrics is None
    assert telemetry.script_instrument() is None
    assert _call_wrapper(Settings(), telemetry) is None
    disabled = build_telemetry(Settings(), {"OTEL_SDK_DISABLED": "true",
                                            "OTEL_TRACES_EXPORTER": "console"})
    assert disabled.tracer is None


def test_exporters_and_samplers_come_from_the_standard_variables() -> None:
    telemetry = build_telemetry(Settings(), {"OTEL_TRACES_EXPORTER": "console"})
    assert telemetry.tracer is not None and telemetry.metrics is None
    assert isinstance(telemetry.tracer_provider, TracerProvider)
    for protocol in ("grpc", "http/protobuf"):
        otlp = build_telemetry(Settings(), {"OTEL_TRACES_EXPORTER": "otlp",
                                            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
        assert otlp.tracer_provider is not None
        otlp.tracer_provider.shutdown()
    sampler = sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                            "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert "0.01" in sampler.get_description()
    with pytest.raises(TelemetryError, match="OTEL_TRACES_EXPORTER"):
        build_telemetry(Settings(), {"OTEL_TRACES_EXPORTER": "jaeger"})
    with pytest.raises(TelemetryError, match="OTEL_TRACES_SAMPLER_ARG"):
        sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"})
    with pytest.raises(TelemetryError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        build_telemetry(Settings(), {"OTEL_TRACES_EXPORTER": "otlp",
                                     "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


_SDK_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_always_on": lambda _: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda _: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}


@pytest.mark.parametrize("name", list(_SDK_SAMPLERS))
def test_the_standard_samplers_decide_as_the_sdks_do(name: str) -> None:
    # the server decides without calling the SDK's sampler: the decisions must be the SDK's
    rng = random.Random(name)
    for ratio in (0.0, 0.01, 0.5, 1.0) if name.endswith("traceidratio") else (1.0,):
        ours, sdk = StandardSampler(name, ratio), _SDK_SAMPLERS[name](ratio)
        assert ours.get_description() == sdk.get_description()
        bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        high = rng.getrandbits(64) << 64
        at_the_bound = [high | low for low in (bound - 1, bound, bound + 1)
                        if 0 < low < 2 ** 64]
        for trace_id in [rng.getrandbits(128) | 1 for _ in range(200)] + at_the_bound:
            for flags in (None, TraceFlags.DEFAULT, TraceFlags.SAMPLED):
                parent = None if flags is None else SpanContext(
                    trace_id, rng.getrandbits(64) | 1, True, TraceFlags(flags))
                context = None if parent is None else trace.set_span_in_context(
                    trace.NonRecordingSpan(parent))
                expected = sdk.should_sample(context, trace_id, "call").decision
                assert ours.samples(trace_id, parent) is (
                    expected is Decision.RECORD_AND_SAMPLE), (name, ratio, trace_id, flags)
                assert ours.should_sample(context, trace_id, "call").decision is expected


def test_json_logs_carry_the_trace_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("creditline.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    try:
        with provider.get_tracer("test").start_as_current_span("call") as span:
            logger.warning("inside %s", "a call")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "inside a call" and inside["level"] == "WARNING"
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside


def test_tracing_off_creates_no_rater_wrapper() -> None:
    from creditline.charging.rating import IncrementRater
    rater = IncrementRater()
    assert Telemetry().traced_rater(rater) is rater


def test_a_sampled_out_call_records_nothing_not_even_children() -> None:
    from creditline.api.interceptors import _PROPAGATOR
    from creditline.charging.rating import IncrementRater, load_plan
    from creditline.observability.telemetry import current_call, current_trace_ids

    exporter = InMemorySpanExporter()
    telemetry = Telemetry()
    telemetry.use_tracing(ParentBased(ALWAYS_ON), [exporter], batched=False)
    recorder = telemetry.spans
    assert recorder is not None
    rater = telemetry.traced_rater(IncrementRater())
    plan = DEFAULT_PLAN_PATH
    tariff = load_plan(plan).tariff_for(RG_VOICE, None)
    assert tariff is not None
    not_sampled = _PROPAGATOR.extract({"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"})
    assert recorder.start_call("creditline.v1.Charging/Initial", not_sampled, {}) is None
    rater.rate_table(tariff, 0, 0, "")  # no current call: no child
    assert current_call() is None and current_trace_ids() is None
    sampled = _PROPAGATOR.extract({"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"})
    span = recorder.start_call("creditline.v1.Charging/Initial", sampled, {"a": 1})
    assert span is not None
    token = recorder.enter(span)
    try:
        assert current_call() is span
        # what the log records carry
        assert current_trace_ids() == (TRACE_ID, format(span.context.span_id, "016x"))
        rater.rate_table(tariff, 0, 0, "")
    finally:
        recorder.leave(token)
    assert current_call() is None and current_trace_ids() is None
    assert exporter.get_finished_spans() == ()  # children are handed over with their call
    recorder.end_call(span, ccr("s-1", "acct-1", 0, block(RG_VOICE)), None, 0)
    rating, call = exporter.get_finished_spans()
    assert rating.parent is not None and rating.parent.span_id == call.context.span_id
    assert rating.context.trace_id == call.context.trace_id
    assert rating.start_time is not None and call.start_time is not None
    assert call.start_time <= rating.start_time
    assert format(call.context.trace_id, "032x") == TRACE_ID
    assert dict(call.attributes or {}) == {
        "a": 1, "creditline.account_id": "acct-1", "creditline.session_id": "s-1",
        "creditline.request_number": 0, "creditline.rating_groups": [RG_VOICE],
        "rpc.grpc.status_code": 0}


class _ThreadNotingExporter(InMemorySpanExporter):
    """Keeps the spans, and the threads they were exported from."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.threads.add(threading.get_ident())
        return super().export(spans)


async def test_batched_call_spans_are_made_in_the_export_thread(
        redis_process: RedisProcess, settings: Settings, checked_books: Books) -> None:
    # as in production: a batch span processor, the calls' spans made in its thread; the
    # SDK's own spans (other code's, through telemetry.tracer) pass through the same one
    exporter = _ThreadNotingExporter()
    telemetry = Telemetry()
    telemetry.use_tracing(sampler_from({}), [exporter])
    assert telemetry.tracer is not None
    running = await start_server(settings, redis_process.url, telemetry)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)
            account_id = f"tel{os.getpid()}-{uuid.uuid4().hex[:12]}"
            checked_books.track(account_id)
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(
                admin_pb.CreateAccountRequest(account_id=account_id,
                                              initial_balance_micros=5_000_000))
            await charging.Initial(ccr("batched-1", account_id, 0,
                                       block(RG_VOICE, requested=60), block(RG_FREE)))
            answer = await charging.Terminate(ccr("batched-1", account_id, 1,
                                                  block(RG_VOICE, used=10)))
            operation = running.store.charge_operation
            with telemetry.tracer.start_as_current_span("other code"):
                pass
    finally:
        await stop_server(running, grace_s=1.0)  # flushes the batch
    assert threading.get_ident() not in exporter.threads and exporter.threads
    spans = exporter.get_finished_spans()
    assert len(_by_name(spans, "other code")) == 1
    [initial] = _by_name(spans, "creditline.v1.Charging/Initial")
    [terminate] = _by_name(spans, "creditline.v1.Charging/Terminate")
    assert dict(initial.attributes or {})["creditline.result_code"] == pb.SUCCESS
    assert list(dict(initial.attributes or {})["creditline.rating_groups"]) == [  # type: ignore[arg-type]
        RG_VOICE, RG_FREE]
    assert dict(terminate.attributes or {})["creditline.result_code"] == answer.result_code
    assert dict(terminate.attributes or {})["creditline.request_number"] == 1
    for call in (initial, terminate):
        children = [span for span in spans
                    if span.parent is not None and span.parent.span_id == call.context.span_id]
        assert f"{operation} charge.lua" in {child.name for child in children}
