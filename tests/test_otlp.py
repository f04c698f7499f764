"""The call spans as OTLP: written directly (otlp_encoding) they say what the SDK's own
encoder says of the same spans, and both OTLP exporters send them to real receivers."""

from __future__ import annotations

import gzip
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from creditline.api.app import start_server, stop_server
from creditline.observability.otlp_encoding import CallEncoder
from creditline.observability.telemetry import (
    INSTRUMENTATION_NAME,
    CallSpan,
    CallSpanExporter,
    add_child,
    build_telemetry,
    request_attributes,
)
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from creditline.v1 import charging_pb2 as pb
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.books import Books
from tests.messages import RG_FREE, RG_VOICE, block, ccr

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
INITIAL = "creditline.v1.Charging/Initial"


def _caller_context(trace_state: str = "") -> SpanContext:
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    if trace_state:
        headers["tracestate"] = trace_state
    return trace.get_current_span(TraceContextTextMapPropagator().extract(headers)
                                  ).get_span_context()


def _calls(count: int) -> list[CallSpan]:
    """Calls of every shape the server makes: with and without a caller, with a trace
    state, failed children and failed calls, answers with and without a result code."""
    rng = random.Random(7)
    base = {"rpc.system": "grpc", "rpc.service": "creditline.v1.Charging",
            "rpc.method": "Initial"}
    script = {"db.system.name": "redis", "db.operation.name": "EVALSHA",
              "creditline.script": "charge.lua"}
    calls = []
    for number in range(count):
        caller = _caller_context("vendor=a,other=b" if number % 4 == 1 else "") \
            if number % 2 else None
        trace_id = caller.trace_id if caller is not None else rng.getrandbits(128) | 1
        context = SpanContext(trace_id, rng.getrandbits(64) | 1, False,
                              TraceFlags(TraceFlags.SAMPLED),
                              None if caller is None else caller.trace_state)
        call = CallSpan(INITIAL, context, caller, time.time_ns(), base)
        for rating_group in (RG_VOICE, 200)[:1 + number % 2]:
            add_child(call, "rating", SpanKind.INTERNAL,
                      {"creditline.rating_group": rating_group}, time.time_ns())
        add_child(call, "EVALSHA charge.lua", SpanKind.CLIENT, script, time.time_ns(),
                  ConnectionError("redis went away") if number % 3 == 0 else None)
        call.end_ns = time.time_ns()
        call.request = ccr(f"s-{number}", f"acct-{number}", number,
                           block(RG_VOICE, requested=60), block(RG_FREE))
        call.response = pb.CreditControlAnswer(result_code=pb.SUCCESS) \
            if number % 5 else None
        if number % 4 == 0:
            call.grpc_status_code = 13
            call.status = Status(StatusCode.ERROR, "INTERNAL")
        calls.append(call)
    return calls


def _spans(request: ExportTraceServiceRequest) -> list[OtlpSpan]:
    return [span for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans for span in scope_spans.spans]


def test_call_spans_written_directly_are_what_the_sdks_encoder_writes() -> None:
    resource = Resource.create({"service.name": "creditline", "host.cores": 2,
                                "debug": False, "load": 0.5, "zones": ("a", "b")})
    calls = _calls(60)
    written = ExportTraceServiceRequest.FromString(CallEncoder(
        resource, INSTRUMENTATION_NAME, request_attributes, lambda: 42).request(calls))

    class _Unused(SpanExporter):
        pass

    made = CallSpanExporter(_Unused(), resource)
    via_sdk = encode_spans([span for call in calls for span in made._spans_of(call)])
    # a child's span id is drawn when its span is made: the two ways draw differently
    for span in _spans(via_sdk):
        if span.name != INITIAL:
            span.span_id = (42).to_bytes(8, "big")
    assert len(_spans(written)) == 60 * 3 + 30 and written == via_sdk


class _HttpReceiver(BaseHTTPRequestHandler):
    requests: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            self.requests.append(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


class _GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, requests: list[ExportTraceServiceRequest]) -> None:
        self.requests = requests

    def Export(self, request: ExportTraceServiceRequest, context: Any
               ) -> ExportTraceServiceResponse:
        self.requests.append(request)
        return ExportTraceServiceResponse()


@contextmanager
def _receiver(protocol: str) -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """A real OTLP receiver on an ephemeral port: its endpoint and what it received."""
    requests: list[ExportTraceServiceRequest] = []
    if protocol == "grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcReceiver(requests),
                                                                  server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield f"http://127.0.0.1:{port}", requests
        finally:
            server.stop(grace=None)
        return
    handler = type("Receiver", (_HttpReceiver,), {"requests": requests})
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http_server.server_port}", requests
    finally:
        http_server.shutdown()
        http_server.server_close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
async def test_the_otlp_exporters_send_the_call_spans_to_a_receiver(
        protocol: str, redis_process: RedisProcess, settings: Settings,
        monkeypatch: pytest.MonkeyPatch, checked_books: Books) -> None:
    with _receiver(protocol) as (endpoint, requests):
        # the exporters read their endpoint from the environment themselves
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        environ = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp",
                   "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_SERVICE_NAME": "ocs-test"}
        running = await start_server(settings, redis_process.url,
                                     build_telemetry(settings, environ))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                account_id = f"otlp{os.getpid()}-{uuid.uuid4().hex[:12]}"
                checked_books.track(account_id)
                await admin_pb2_grpc.AdminStub(channel).CreateAccount(
                    admin_pb.CreateAccountRequest(account_id=account_id,
                                                  initial_balance_micros=5_000_000))
                answer = await charging_pb2_grpc.ChargingStub(channel).Initial(
                    ccr(f"{account_id};otlp-1", account_id, 0, block(RG_VOICE, requested=60)),
                    metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"),))
                assert answer.result_code == pb.SUCCESS
                operation = running.store.charge_operation  # FCALL, or EVALSHA on Redis 6
        finally:
            await stop_server(running, grace_s=1.0)  # flushes the batch to the receiver
    assert requests
    service_names = {attribute.value.string_value for request in requests
                     for resource_spans in request.resource_spans
                     for attribute in resource_spans.resource.attributes
                     if attribute.key == "service.name"}
    assert service_names == {"ocs-test"}
    spans = [span for request in requests for span in _spans(request)]
    [initial] = [span for span in spans if span.name == INITIAL]
    assert initial.trace_id.hex() == TRACE_ID and initial.parent_span_id.hex() == PARENT_SPAN_ID
    assert initial.kind == OtlpSpan.SPAN_KIND_SERVER
    attributes = {attribute.key: attribute.value for attribute in initial.attributes}
    assert attributes["creditline.account_id"].string_value == account_id
    assert attributes["creditline.result_code"].int_value == pb.SUCCESS
    assert [value.int_value for value in
            attributes["creditline.rating_groups"].array_value.values] == [RG_VOICE]
    children = {span.name for span in spans if span.parent_span_id == initial.span_id}
    # (on one Redis server the session id's claim is taken inside the charging script)
    assert children == {"rating", f"{operation} charge.lua"}
    assert any(span.name == "creditline.v1.Admin/CreateAccount" for span in spans)
