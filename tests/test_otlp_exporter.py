"""The server's OTLP span exporter (observability/otlp_traces.py) against a real receiver,
over gRPC and HTTP: the standard variables' endpoint, headers and compression, retries of
a transient refusal within the timeout, a permanent refusal dropped with a warning, and
bad variables named."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from creditline.errors import TelemetryError
from creditline.observability.otlp_traces import otlp_span_exporter, otlp_target
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.otlp_receiver import Receiver, otlp_receiver

PROTOCOLS = ["grpc", "http/protobuf"]


def _finished_spans(count: int) -> list:  # type: ignore[type-arg]
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "exporter-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    for number in range(count):
        with tracer.start_as_current_span(f"span-{number}", attributes={"n": number}):
            pass
    return list(memory.get_finished_spans())


def _export(protocol: str, receiver: Receiver, **variables: str) -> SpanExportResult:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **variables}
    exporter = otlp_span_exporter(protocol, environ)
    try:
        return exporter.export(_finished_spans(3))
    finally:
        exporter.shutdown()


@pytest.mark.parametrize(("protocol", "compression"), [
    ("grpc", "gzip"), ("grpc", "none"), ("http/protobuf", "gzip"),
    ("http/protobuf", "deflate"), ("http/protobuf", "none")])
def test_spans_reach_the_receiver_with_the_configured_headers_and_compression(
        protocol: str, compression: str) -> None:
    with otlp_receiver(protocol) as receiver:
        result = _export(protocol, receiver,
                         OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-api-key=s%20cret,Tenant=ocs",
                         OTEL_EXPORTER_OTLP_COMPRESSION=compression)
    assert result is SpanExportResult.SUCCESS
    assert [span.name for span in receiver.spans()] == ["span-0", "span-1", "span-2"]
    [headers] = receiver.headers
    assert headers["x-api-key"] == "s cret" and headers["tenant"] == "ocs"
    if protocol == "http/protobuf":
        assert headers.get("content-encoding", "none") == compression
        assert headers["content-type"] == "application/x-protobuf"
    # (gRPC's compression is the transport's: grpc's server shows no header of it)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_transient_refusal_is_retried_and_the_spans_arrive_once(protocol: str) -> None:
    with otlp_receiver(protocol) as receiver:
        receiver.refusals.append(503)
        result = _export(protocol, receiver)
    assert result is SpanExportResult.SUCCESS
    assert receiver.attempts == 2 and len(receiver.spans()) == 3


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_permanent_refusal_drops_the_batch_with_a_warning(
        protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    with otlp_receiver(protocol) as receiver, caplog.at_level(logging.WARNING):
        receiver.refusals.append(400)
        result = _export(protocol, receiver)
    assert result is SpanExportResult.FAILURE
    assert receiver.attempts == 1 and not receiver.spans()
    assert "3 spans not exported" in caplog.text


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retries_end_within_the_timeout(protocol: str) -> None:
    with otlp_receiver(protocol) as receiver:
        receiver.refusals.extend([503] * 10)
        start_s = time.monotonic()
        result = _export(protocol, receiver, OTEL_EXPORTER_OTLP_TIMEOUT="2.5")
        took_s = time.monotonic() - start_s
    assert result is SpanExportResult.FAILURE
    assert 2 <= receiver.attempts < 10 and took_s < 3.5


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_receiver_that_is_not_there_fails_the_export_within_the_timeout(
        protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    exporter = otlp_span_exporter(protocol, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1.5"})
    start_s = time.monotonic()
    with caplog.at_level(logging.WARNING):
        result = exporter.export(_finished_spans(1))
    exporter.shutdown()
    assert result is SpanExportResult.FAILURE and time.monotonic() - start_s < 2.5
    assert "1 spans not exported" in caplog.text


def test_the_endpoint_rules_of_the_otlp_variables() -> None:
    assert otlp_target({}, "grpc").endpoint == "http://localhost:4317"
    assert otlp_target({}, "http/protobuf").endpoint == "http://localhost:4318/v1/traces"
    generic = {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/"}
    assert otlp_target(generic, "http/protobuf").endpoint == "https://collector:4318/v1/traces"
    own = {**generic, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/traces"}
    assert otlp_target(own, "http/protobuf").endpoint == "https://c/traces"
    assert otlp_target(own, "grpc").endpoint == "https://c/traces"


@pytest.mark.parametrize(("variable", "value"), [
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli"), ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")])
def test_a_bad_variable_is_named(variable: str, value: str) -> None:
    with pytest.raises(TelemetryError, match=variable):
        otlp_target({variable: value}, "grpc")
