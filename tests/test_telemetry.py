"""Traces, metrics and logs, read from in-memory exporters and a real scrape endpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from creditline.api.app import RunningServer, _call_wrapper, start_server, stop_server
from creditline.api.interceptors import _end_span
from creditline.observability.logging_setup import JsonFormatter, TraceIdFilter
from creditline.observability.telemetry import (
    CallRecord,
    Telemetry,
    TelemetryError,
    build_telemetry,
    sampler_from,
)
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, free_port
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as notifications_pb
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from tests.books import Books
from tests.conftest import settings_with
from tests.messages import RG_FREE, RG_PEAK_VOICE, RG_VOICE, block, ccr
from tests.processes import START_TIMEOUT_S, serve, stop, wait_for_port
from tests.stream_client import charging_over
from tests.waiting import until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@dataclass
class Observed:
    running: RunningServer
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    charging: charging_pb2_grpc.ChargingStub
    admin: admin_pb2_grpc.AdminStub
    channel: grpc.aio.Channel


@pytest.fixture(scope="module")
async def observed(redis_process: RedisProcess, settings: Settings
                   ) -> AsyncIterator[Observed]:
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    # the sampler the server builds by default (parentbased_always_on)
    telemetry = build_telemetry(settings, {}, span_exporter=spans, metric_reader=reader)
    running = await start_server(settings, redis_process.url, telemetry)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Observed(running, spans, reader, charging_pb2_grpc.ChargingStub(channel),
                       admin_pb2_grpc.AdminStub(channel), channel)
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
        ccr("trace-1", account_id, 0, block(RG_PEAK_VOICE, requested=60), block(RG_VOICE),
            block(RG_FREE)),
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
    assert list(attributes["creditline.rating_groups"]) == [  # type: ignore[arg-type]
        RG_PEAK_VOICE, RG_VOICE, RG_FREE]
    assert attributes["creditline.result_code"] == pb.SUCCESS
    # its Redis script call (one: the charging function) counted and timed on it, and one
    # child: the rating of the banded tariff (the voice one's table is made once, the free
    # one needs none)
    assert attributes["creditline.redis.calls"] == 1
    assert 0 < attributes["creditline.redis.duration_s"] < 10  # type: ignore[operator]
    [rating] = _by_name(spans, "rating")
    assert rating.parent is not None and rating.parent.span_id == rpc.context.span_id
    assert rating.context.trace_id == rpc.context.trace_id
    assert (rating.attributes or {})["creditline.rating_group"] == RG_PEAK_VOICE
    assert {span.name for span in spans if span.parent is not None
            and span.parent.span_id == rpc.context.span_id} == {"rating"}


async def test_calls_at_once_each_continue_their_own_callers_trace(
        observed: Observed, checked_books: Books) -> None:
    """Each call's handler is chosen with its own metadata (handlers.ByMetadata): calls
    made at once, some with a caller's trace and some without, never take another's."""
    account_id = await _account(observed, checked_books, balance_micros=100_000_000)
    observed.spans.clear()
    callers = {f"at-once-{n}": uuid.uuid4().hex if n % 3 else None for n in range(24)}

    async def event(session_id: str, trace_id: str | None) -> None:
        metadata = () if trace_id is None else (
            ("traceparent", f"00-{trace_id}-{PARENT_SPAN_ID}-01"),)
        answer = await observed.charging.Event(pb.EventRequest(
            session_id=session_id, account_id=account_id, action=pb.DIRECT_DEBIT,
            rating_groups=[block(RG_VOICE, requested=1)]), metadata=metadata)
        assert answer.result_code == pb.SUCCESS

    await asyncio.gather(*(event(sid, trace) for sid, trace in callers.items()))
    spans = _by_name(observed.spans.get_finished_spans(), "creditline.v1.Charging/Event")
    by_session = {(span.attributes or {})["creditline.session_id"]: span for span in spans}
    assert set(by_session) == set(callers)
    for session_id, trace_id in callers.items():
        span = by_session[session_id]
        if trace_id is None:
            assert span.parent is None
            assert format(span.context.trace_id, "032x") not in callers.values()
        else:
            assert format(span.context.trace_id, "032x") == trace_id
            assert span.parent is not None and span.parent.is_remote


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


async def test_a_client_error_is_not_an_error_span(observed: Observed) -> None:
    # OTel's rpc conventions for a server: NOT_FOUND, INVALID_ARGUMENT are the caller's
    observed.spans.clear()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await observed.admin.GetAccount(admin_pb.GetAccountRequest(account_id="nobody-x"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    [rpc] = _by_name(observed.spans.get_finished_spans(), "creditline.v1.Admin/GetAccount")
    assert rpc.status.status_code is not StatusCode.ERROR
    assert not rpc.events  # no exception recorded for an answer the server chose
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


def scrape(url: str) -> str:
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
        text = await asyncio.to_thread(scrape, url)
        assert "creditline_rpc_requests" in text and 'rpc_method="GetAccount"' in text
        assert "rpc_server_call_duration" in text
        deadline = time.monotonic() + 10
        while "creditline_accounts" not in text or "creditline_cdr_backlog" not in text:
            # the first count may still be running
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
            text = await asyncio.to_thread(scrape, url)
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


@pytest.mark.parametrize(("name", "expected"), [
    ("always_on", ALWAYS_ON), ("always_off", ALWAYS_OFF),
    ("traceidratio", TraceIdRatioBased(0.01)), ("parentbased_always_on", ParentBased(ALWAYS_ON)),
    ("parentbased_always_off", ParentBased(ALWAYS_OFF)),
    ("parentbased_traceidratio", ParentBased(TraceIdRatioBased(0.01)))])
def test_the_standard_sampler_names_make_the_sdks_samplers(name: str, expected: Sampler
                                                           ) -> None:
    ours = sampler_from({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    assert type(ours) is type(expected)
    assert ours.get_description() == expected.get_description()
    with pytest.raises(TelemetryError, match="OTEL_TRACES_SAMPLER"):
        sampler_from({"OTEL_TRACES_SAMPLER": "jaeger_remote"})


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


async def test_a_sampled_out_call_records_nothing_not_even_children(
        observed: Observed, checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    observed.spans.clear()
    answer = await observed.charging.Initial(
        ccr("unsampled-1", account_id, 0, block(RG_VOICE, requested=60)),
        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"),))
    assert answer.result_code == pb.SUCCESS
    assert observed.spans.get_finished_spans() == ()  # no rating, no script span either


async def test_each_request_of_a_stream_is_a_span_linked_to_the_streams(
        observed: Observed, checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    observed.spans.clear()
    async with charging_over(observed.channel, "stream") as stream:
        await stream.Initial(ccr("stream-1", account_id, 0, block(RG_VOICE, requested=60)))
        answer = await stream.Terminate(ccr("stream-1", account_id, 1, block(RG_VOICE, used=30)))
    assert answer.result_code == pb.SUCCESS
    spans = await _spans_named(observed, "creditline.v1.Charging/Stream")
    [whole] = _by_name(spans, "creditline.v1.Charging/Stream")
    for method, number in (("Initial", 0), ("Terminate", 1)):
        [request] = _by_name(spans, f"creditline.v1.Charging/{method}")
        attributes = dict(request.attributes or {})
        assert attributes["rpc.method"] == method and attributes["rpc.service"] == (
            "creditline.v1.Charging")
        assert attributes["creditline.session_id"] == "stream-1"
        assert attributes["creditline.request_number"] == number
        assert attributes["creditline.result_code"] == pb.SUCCESS
        # a trace of its own (sampled on its own), linked to the stream's span
        assert request.parent is None and request.kind is SpanKind.SERVER
        assert [link.context.span_id for link in request.links] == [whole.context.span_id]
        # its Redis call is its own, not the stream's
        assert (request.attributes or {})["creditline.redis.calls"] == 1
    assert not [span for span in spans
                if span.parent is not None and span.parent.span_id == whole.context.span_id]
    assert "creditline.redis.calls" not in (whole.attributes or {})
    requests = _points(observed.metrics, "creditline.rpc.requests")
    assert any(p.attributes["rpc.method"] == "Terminate"
               and p.attributes["creditline.transport"] == "stream"
               and p.attributes["creditline.result_code"] == pb.SUCCESS for p in requests)


async def _spans_named(observed: Observed, name: str) -> tuple[ReadableSpan, ...]:
    """The finished spans once one named `name` is among them (a stream's span ends on
    the server after its client has seen the end)."""
    deadline = time.monotonic() + 10
    while not _by_name(spans := observed.spans.get_finished_spans(), name):
        assert time.monotonic() < deadline, [span.name for span in spans]
        await asyncio.sleep(0.02)
    return spans


async def test_a_subscription_is_one_span_and_its_events_are_counted(
        observed: Observed, checked_books: Books) -> None:
    account_id = await _account(observed, checked_books)
    observed.spans.clear()
    notifications = notifications_pb2_grpc.NotificationsStub(observed.channel)
    call = notifications.Subscribe(
        notifications_pb.SubscribeRequest(account_ids=[account_id]),
        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),))
    await asyncio.wait_for(call.initial_metadata(), 10)  # live: every later charge reaches it
    await observed.charging.Initial(ccr("sub-1", account_id, 0, block(RG_VOICE, requested=60)))
    await asyncio.wait_for(call.read(), 10)
    call.cancel()
    spans = await _spans_named(observed, "creditline.v1.Notifications/Subscribe")
    [subscription] = _by_name(spans, "creditline.v1.Notifications/Subscribe")
    assert subscription.parent is not None
    assert format(subscription.parent.span_id, "016x") == PARENT_SPAN_ID
    assert subscription.status.status_code is not StatusCode.ERROR  # the caller left
    delivered = _points(observed.metrics, "creditline.events.delivered")
    assert sum(p.value for p in delivered if p.attributes["rpc.method"] == "Subscribe") >= 1


def samples_of(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A scrape's samples: name -> (labels, value) each."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total_of(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
           **labels: str) -> float:
    return sum(value for have, value in samples.get(name, [])
               if all(have.get(key) == wanted for key, wanted in labels.items()))


async def _session(charging: Any, account_id: str, session_id: str) -> list[Any]:
    """Initial, an Update and a Terminate of one voice session: their answers."""
    return [
        await charging.Initial(ccr(session_id, account_id, 0, block(RG_VOICE, requested=60))),
        await charging.Update(ccr(session_id, account_id, 1,
                                  block(RG_VOICE, used=60, requested=60))),
        await charging.Terminate(ccr(session_id, account_id, 2, block(RG_VOICE, used=45))),
    ]


async def test_the_money_counters_equal_the_books_on_unary_and_on_stream(
        redis_process: RedisProcess, settings: Settings, checked_books: Books) -> None:
    running = await start_server(
        settings_with(settings, metrics_listen_address="127.0.0.1:0"), redis_process.url,
        environ={})
    charged_in_answers = granted_in_answers = 0
    accounts = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            for transport in ("unary", "stream"):
                account_id = f"money{os.getpid()}-{uuid.uuid4().hex[:12]}"
                checked_books.track(account_id)
                accounts.append(account_id)
                await admin.CreateAccount(admin_pb.CreateAccountRequest(
                    account_id=account_id, initial_balance_micros=50_000_000))
                async with charging_over(channel, transport) as charging:
                    for answer in await _session(charging, account_id, f"{transport}-m"):
                        assert answer.result_code == pb.SUCCESS, answer
                        charged_in_answers += sum(b.charged_micros for b in answer.rating_groups)
                        granted_in_answers += sum(b.granted.time_s for b in answer.rating_groups)
        samples = samples_of(await asyncio.to_thread(
            scrape, f"http://127.0.0.1:{running.telemetry.prometheus_port}/metrics"))
    finally:
        await stop_server(running, grace_s=1.0)
    books = [await checked_books.read(account_id) for account_id in accounts]
    assert charged_in_answers > 0
    assert total_of(samples, "creditline_charged_total") == charged_in_answers == sum(
        account.charged for account in books)
    assert total_of(samples, "creditline_units_granted_total", creditline_unit="time_s") == (
        granted_in_answers)
    for method in ("Initial", "Update", "Terminate"):
        for transport in ("unary", "stream"):
            assert total_of(samples, "creditline_rpc_requests_total", rpc_method=method,
                          creditline_transport=transport) == 1, (method, transport)


async def test_the_prometheus_endpoint_shows_the_operations_signals(
        redis_process: RedisProcess, settings: Settings, checked_books: Books) -> None:
    running = await start_server(
        settings_with(settings, metrics_listen_address="127.0.0.1:0",
                      metrics_accounts_interval_s=0.05), redis_process.url, environ={})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            account_id = f"signals{os.getpid()}-{uuid.uuid4().hex[:12]}"
            checked_books.track(account_id)
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=50_000_000))
            subscription = notifications_pb2_grpc.NotificationsStub(channel).Subscribe(
                notifications_pb.SubscribeRequest(account_ids=[account_id]))
            await asyncio.wait_for(subscription.initial_metadata(), 10)
            async with charging_over(channel, "stream") as charging:
                await _session(charging, account_id, "signals-1")
            await asyncio.wait_for(subscription.read(), 10)
            url = f"http://127.0.0.1:{running.telemetry.prometheus_port}/metrics"
            samples = samples_of(await asyncio.to_thread(scrape, url))
            subscription.cancel()
    finally:
        await stop_server(running, grace_s=1.0)
    assert total_of(samples, "creditline_rpc_in_flight", rpc_method="Subscribe") == 1
    assert total_of(samples, "creditline_rpc_in_flight", rpc_method="Update") == 0
    assert "creditline_stream_in_flight" in samples
    assert total_of(samples, "creditline_events_delivered_total") >= 1
    assert total_of(samples, "creditline_redis_up") == 1
    assert "creditline_hub_lag" in samples
    assert "creditline_supervision_closures_total" in samples
    assert total_of(samples, "creditline_notification_subscribers") == 1


def _free_port_pair() -> int:
    """A port P with P + 1 free too (two workers' metrics endpoints)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two free ports in a row")


def _wait_until_serving(metrics_url: str, process: subprocess.Popen[str]) -> None:
    """Until the worker behind `metrics_url` serves gRPC: its supervision's counter is
    exposed only once its server has started (its metrics port opens before)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if "creditline_supervision_closures_total" in scrape(metrics_url):
                return
        except OSError:
            pass  # its metrics port is not open yet
        time.sleep(0.1)
    pytest.fail(f"the worker behind {metrics_url} did not start")


async def test_one_scrape_per_worker_shows_every_workers_traffic() -> None:
    port, metrics_port = free_port(), _free_port_pair()
    process = serve("--listen-address", f"127.0.0.1:{port}", "--workers", "2",
                    "--metrics-listen-address", f"127.0.0.1:{metrics_port}")
    try:
        wait_for_port(port, process)
        for n in range(2):
            _wait_until_serving(f"http://127.0.0.1:{metrics_port + n}/metrics", process)
        calls = 20
        for n in range(calls):  # new connections: the kernel spreads them over the workers
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(
                    grpc.RpcError):
                admin_pb2_grpc.AdminStub(channel).GetAccount(
                    admin_pb.GetAccountRequest(account_id=f"nobody-{n}"))

        def counts() -> list[float]:
            return [total_of(samples_of(scrape(f"http://127.0.0.1:{metrics_port + n}/metrics")),
                             "creditline_rpc_requests_total", rpc_method="GetAccount")
                    for n in range(2)]
        # a call is counted as its handler ends, which can come after its caller got the
        # answer (one CI run scraped 19 of 20): wait for the last one
        await until(lambda: sum(counts()) >= calls, 5.0)
        counted = counts()
        assert sum(counted) == calls and all(counted), counted
    finally:
        output = stop(process)
    assert f"127.0.0.1:{metrics_port}" in output and "port + n" in output, output


@pytest.mark.parametrize(("status", "error_span"), [
    (grpc.StatusCode.NOT_FOUND, False), (grpc.StatusCode.INVALID_ARGUMENT, False),
    (grpc.StatusCode.CANCELLED, False), (grpc.StatusCode.INTERNAL, True),
    (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.DEADLINE_EXCEEDED, True)])
def test_only_server_errors_make_an_error_span(status: grpc.StatusCode, error_span: bool
                                               ) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("test").start_span("call")
    _end_span(CallRecord(span, {}), None, status, RuntimeError("boom") if error_span else None)
    [ended] = exporter.get_finished_spans()
    assert (ended.status.status_code is StatusCode.ERROR) is error_span
    assert (ended.attributes or {})["rpc.grpc.status_code"] == status.value[0]
    assert [event.name for event in ended.events] == (["exception"] if error_span else [])


@pytest.mark.parametrize("with_metrics", [False, True])
async def test_parentbased_traceidratio_traces_that_share_of_roots_and_follows_callers(
        redis_process: RedisProcess, settings: Settings, checked_books: Books,
        with_metrics: bool) -> None:
    """OTEL_TRACES_SAMPLER=parentbased_traceidratio: the root sampling drawn ahead of the
    SDK traces about the ratio of calls with no trace context (the rest get no span at
    all), always a caller's sampled trace and never a caller's unsampled one; a Stream's
    request left out gives its Redis call to no span (the stream's is not its parent).
    With metrics on too, every call is counted, traced or left out (a left-out unary call
    is then served by the wrapper without a span; with tracing alone, unwrapped)."""
    spans = InMemorySpanExporter()
    reader = InMemoryMetricReader() if with_metrics else None
    environ = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
               "OTEL_TRACES_SAMPLER_ARG": "0.2"}
    running = await start_server(settings, redis_process.url, build_telemetry(
        settings, environ, span_exporter=spans, metric_reader=reader))
    calls = 400
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            admin = admin_pb2_grpc.AdminStub(channel)
            account_id = f"ratio{os.getpid()}-{uuid.uuid4().hex[:12]}"
            checked_books.track(account_id)
            await admin.CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=10**12))
            charging = charging_pb2_grpc.ChargingStub(channel)
            for number in range(calls):
                await charging.Event(_sms_debit(account_id, f"root-{number}"))
            for flags in ("01", "00"):
                for number in range(20):
                    await charging.Event(
                        _sms_debit(account_id, f"caller-{flags}-{number}"),
                        metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-{flags}"),))
            async with charging_over(channel, "stream") as streamed:
                for number in range(60):
                    await streamed.Event(_sms_debit(account_id, f"stream-{number}"))
    finally:
        await stop_server(running, grace_s=1.0)
    events = _by_name(spans.get_finished_spans(), "creditline.v1.Charging/Event")

    def session(span: ReadableSpan) -> str:
        return str((span.attributes or {})["creditline.session_id"])

    roots = [span for span in events if session(span).startswith("root-")]
    # 400 draws at 0.2: 80 expected; outside 45..120 happens less than once in 10^6 runs
    assert 45 <= len(roots) <= 120, len(roots)
    assert all(span.parent is None for span in roots)
    # (the store times a sampled call's script call: it skips the timing only when
    # nothing records it, a left-out call with metrics off)
    assert all((span.attributes or {})["creditline.redis.calls"] == 1 for span in roots)
    followed = [span for span in events if session(span).startswith("caller-")]
    assert {session(span)[:9] for span in followed} == {"caller-01"} and len(followed) == 20
    assert {format(span.context.trace_id, "032x") for span in followed} == {TRACE_ID}
    streamed = [span for span in events if session(span).startswith("stream-")]
    assert 0 < len(streamed) < 60  # (60 draws at 0.2: none or all, once in 10^5 runs)
    assert all((span.attributes or {})["creditline.redis.calls"] == 1 for span in streamed)
    for stream in _by_name(spans.get_finished_spans(), "creditline.v1.Charging/Stream"):
        # (the stream's own span is drawn as a root too; its requests' Redis calls are
        # never its own, traced or not)
        assert "creditline.redis.calls" not in (stream.attributes or {})
    if reader is not None:
        counted = {transport: sum(
            point.value for point in _points(reader, "creditline.rpc.requests")
            if point.attributes["rpc.method"] == "Event"
            and point.attributes["creditline.transport"] == transport)
            for transport in ("unary", "stream")}
        assert counted == {"unary": calls + 40, "stream": 60}
        # every call's script call timed with metrics on, traced or left out
        timed = sum(point.count for point in _points(reader, "creditline.redis.script.duration")
                    if point.attributes["creditline.script"] == "charge.lua")
        assert timed == calls + 40 + 60


@pytest.mark.parametrize(("sampler", "traced"), [
    ("parentbased_always_on", False), ("parentbased_traceidratio", False),
    ("always_on", True), ("traceidratio", True)])
async def test_a_callers_unsampled_trace_is_left_out_only_by_a_parent_based_sampler(
        redis_process: RedisProcess, settings: Settings, checked_books: Books,
        sampler: str, traced: bool) -> None:
    """The wrapper leaves a caller's unsampled trace out ahead of the SDK (no span made)
    only where the SDK's sampler would drop it too; always_on and traceidratio (ratio 1)
    trace it in the caller's trace, as the SDK decides."""
    spans = InMemorySpanExporter()
    environ = {"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "1.0"}
    running = await start_server(settings, redis_process.url,
                                 build_telemetry(settings, environ, span_exporter=spans))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            account_id = f"unsampled{os.getpid()}-{uuid.uuid4().hex[:12]}"
            checked_books.track(account_id)
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(admin_pb.CreateAccountRequest(
                account_id=account_id, initial_balance_micros=10**9))
            answer = await charging_pb2_grpc.ChargingStub(channel).Event(
                _sms_debit(account_id, "unsampled-caller"),
                metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-00"),))
            assert answer.result_code == pb.SUCCESS
    finally:
        await stop_server(running, grace_s=1.0)
    events = _by_name(spans.get_finished_spans(), "creditline.v1.Charging/Event")
    assert len(events) == (1 if traced else 0)
    if traced:
        assert format(events[0].context.trace_id, "032x") == TRACE_ID


def _sms_debit(account_id: str, session_id: str) -> pb.EventRequest:
    return pb.EventRequest(session_id=session_id, account_id=account_id,
                           action=pb.DIRECT_DEBIT, rating_groups=[pb.RatingGroupRequest(
                               rating_group=RG_VOICE, requested=pb.Units(time_s=1))])
