"""The OTLP span encoder (native/otlp_spans.pyx and its pure twin) writes the same bytes as
the stock encoder (opentelemetry-exporter-otlp-proto-common's encode_spans, serialized by
protobuf), for any spans the SDK makes: Hypothesis draws them, both twins encode them, and
each result must equal the stock bytes and parse as opentelemetry-proto's message."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from creditline.native import otlp_spans, otlp_spans_py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

ENCODERS = {"compiled": otlp_spans.encode_spans, "pure": otlp_spans_py.encode_spans}
MANY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(max_size=12)
int64s = st.integers(-(1 << 63), (1 << 63) - 1)
scalars = st.one_of(texts, st.booleans(), int64s, st.floats(allow_nan=False), st.binary(max_size=8))
# the SDK's attribute values: scalars and sequences of one scalar type
values = st.one_of(scalars, st.lists(texts, max_size=3), st.lists(int64s, max_size=3),
                   st.lists(st.booleans(), max_size=3), st.none())
attributes = st.dictionaries(texts, values, max_size=5)
nanos = st.integers(0, (1 << 64) - 1)
trace_ids = st.integers(1, (1 << 128) - 1)
span_ids = st.integers(1, (1 << 64) - 1)
trace_states = st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True),
                                  st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)),
                        max_size=2, unique_by=lambda pair: pair[0]).map(TraceState)


@st.composite
def contexts(draw: st.DrawFn) -> SpanContext:
    return SpanContext(draw(trace_ids), draw(span_ids), is_remote=draw(st.booleans()),
                       trace_flags=TraceFlags(draw(st.sampled_from([0, 1]))),
                       trace_state=draw(trace_states))


@st.composite
def spans(draw: st.DrawFn, resources: list[Resource], scopes: list[InstrumentationScope | None]
          ) -> ReadableSpan:
    return ReadableSpan(
        name=draw(texts), context=draw(contexts()),
        parent=draw(st.none() | contexts()),
        resource=draw(st.sampled_from(resources)),
        attributes=draw(attributes),
        events=draw(st.lists(st.builds(Event, texts, attributes, nanos), max_size=2)),
        links=draw(st.lists(st.builds(Link, contexts(), attributes), max_size=2)),
        kind=draw(st.sampled_from(list(SpanKind))),
        status=draw(st.builds(Status, st.sampled_from(list(StatusCode)), st.none() | texts)),
        start_time=draw(nanos), end_time=draw(nanos),
        instrumentation_scope=draw(st.sampled_from(scopes)))


RESOURCES = [Resource.create({"service.name": "creditline"}),
             Resource({"service.name": "other", "n": 1}, schema_url="https://s/1")]
SCOPES: list[InstrumentationScope | None] = [
    InstrumentationScope("creditline", "1.0"), None,
    InstrumentationScope("x", None, "https://s/2", {"a": "b"})]


def _assert_same_as_stock(batch: list[ReadableSpan]) -> None:
    stock = encode_spans(batch).SerializeToString()
    for name, encode in ENCODERS.items():
        encoded = encode(batch)
        assert encoded == stock, name
    ExportTraceServiceRequest.FromString(stock)  # (and it is a valid message)


@MANY
@given(st.lists(spans(RESOURCES, SCOPES), max_size=6))
def test_any_spans_encode_to_the_stock_encoders_bytes(batch: list[ReadableSpan]) -> None:
    _assert_same_as_stock(batch)


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_the_sdks_own_spans_with_dropped_attributes_events_and_links() -> None:
    """Spans made by the SDK's tracer (its BoundedAttributes, limits that drop)."""
    kept = _Keep()
    provider = TracerProvider(resource=RESOURCES[0], span_limits=SpanLimits(
        max_span_attributes=2, max_events=1, max_links=1, max_event_attributes=1))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("creditline", "1.0")
    with tracer.start_as_current_span("call", kind=SpanKind.SERVER,
                                      attributes={"a": 1, "b": "x", "c": [1, 2]}) as call:
        call.add_event("first", {"k": "v", "l": 2})
        call.add_event("second")
        with tracer.start_as_current_span(
                "child", links=[Link(call.get_span_context()), Link(call.get_span_context())]):
            pass
        call.set_status(Status(StatusCode.ERROR, "failed"))
    assert kept.spans[1].dropped_attributes == 1 and kept.spans[1].dropped_events == 1
    _assert_same_as_stock(kept.spans)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_a_value_protobuf_cannot_hold_is_left_out_and_logged(
        encoder: str, caplog: pytest.LogCaptureFixture) -> None:
    span = ReadableSpan(name="s", context=SpanContext(1, 2, is_remote=False),
                        resource=RESOURCES[0],
                        attributes={"big": 1 << 70, "kept": 1, "odd": object()})  # type: ignore[dict-item]
    with caplog.at_level(logging.ERROR):
        encoded = ENCODERS[encoder]([span])
    [otlp_span] = ExportTraceServiceRequest.FromString(encoded).resource_spans[0] \
        .scope_spans[0].spans
    assert [attribute.key for attribute in otlp_span.attributes] == ["kept"]
    assert "big" in caplog.text and "odd" in caplog.text
