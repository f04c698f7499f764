"""OpenTelemetry for the server: traces and metrics, chosen by the standard OTEL_*
environment variables, built once from the settings and passed explicitly (no global
tracer or meter provider is set).

Traces: OTEL_TRACES_EXPORTER = none (the default here) | otlp | console (comma list);
OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL = http/protobuf (default) | grpc; endpoints, headers and
timeouts as the OTLP exporters read them (OTEL_EXPORTER_OTLP_ENDPOINT, ...);
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on);
OTEL_SERVICE_NAME (default creditline) and OTEL_RESOURCE_ATTRIBUTES; OTEL_SDK_DISABLED=true
turns everything off. With no exporter the server builds no tracer at all: the call path
then creates no span and pays nothing.

Metrics: OTEL_METRICS_EXPORTER = none (default) | otlp | console | prometheus, and the
setting metrics_listen_address, which serves a Prometheus scrape endpoint (implies
prometheus). Instruments: see `Metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from threading import Thread
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, Tracer
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from creditline.errors import TelemetryError
from creditline.observability.otlp_encoding import CallEncoder
from creditline.settings import Settings

if TYPE_CHECKING:
    from creditline.charging.rating import Rater, RateTable, Tariff
    from creditline.store.store import RedisClient

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTRUMENTATION_NAME = "creditline"
DEFAULT_SERVICE_NAME = "creditline"
# Latency buckets in seconds: a charging call is expected in the low milliseconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
                     5.0)
_TRACE_EXPORTERS = ("none", "otlp", "console")
_METRIC_EXPORTERS = ("none", "otlp", "console", "prometheus")
_OTLP_PROTOCOLS = ("http/protobuf", "grpc")
# The low 64 bits of a trace id, which ratio sampling compares (the SDK's TRACE_ID_LIMIT)
_TRACE_ID_LOW_BITS = TraceIdRatioBased.TRACE_ID_LIMIT


def _names(environ: Mapping[str, str], variable: str, allowed: tuple[str, ...]) -> list[str]:
    raw = environ.get(variable, "none").strip().lower() or "none"
    names = [name.strip() for name in raw.split(",") if name.strip()]
    for name in names:
        if name not in allowed:
            raise TelemetryError(f"environment {variable}: {name!r} is not one of "
                                 f"{', '.join(allowed)}")
    return [name for name in names if name != "none"]


def sdk_disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


_SAMPLER_NAMES = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
                  "parentbased_always_off", "parentbased_traceidratio")


class StandardSampler(Sampler):
    """One of the samplers OTEL_TRACES_SAMPLER names: the SDK's (should_sample, for
    anything that asks it), and `samples`, the same decision for the server's call spans
    made without a call into the SDK.

    Why: the SDK's should_sample costs ~7 us per call in the running server (ParentBased
    looks the parent up in the context again and builds a SamplingResult), more than half
    of what 1 % sampling cost in all (bench/tracing_overhead.py --sections). The rules are
    the specification's, few and fixed: a parent-based sampler follows the caller's sampled
    flag; otherwise a trace is kept when its id's low 64 bits are below ratio x 2^64 (1 for
    always_on, 0 for always_off). A test holds the two to the same decisions."""

    def __init__(self, name: str, ratio: float = 1.0) -> None:
        if name not in _SAMPLER_NAMES:
            raise TelemetryError(f"environment OTEL_TRACES_SAMPLER: {name!r} is not one of "
                                 f"{', '.join(_SAMPLER_NAMES)}")
        self.parent_based = name.startswith("parentbased_")
        root_name = name.removeprefix("parentbased_")
        # the root sampler and the bound its trace ids' low 64 bits must stay below
        roots: dict[str, tuple[Sampler, int]] = {
            "always_on": (ALWAYS_ON, _TRACE_ID_LOW_BITS + 1), "always_off": (ALWAYS_OFF, 0)}
        root, self._root_bound = roots.get(root_name) or (
            TraceIdRatioBased(ratio), TraceIdRatioBased.get_bound_for_rate(ratio))
        self._sdk = ParentBased(root) if self.parent_based else root

    def samples(self, trace_id: int, parent: SpanContext | None) -> bool:
        """Whether a span of `trace_id` is kept; `parent` is the caller's valid span
        context, None for a new trace."""
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        return trace_id & _TRACE_ID_LOW_BITS < self._root_bound

    def should_sample(self, parent_context: TraceContext | None, trace_id: int, name: str,
                      kind: SpanKind | None = None, attributes: Attributes = None,
                      links: Sequence[Link] | None = None,
                      trace_state: TraceState | None = None) -> SamplingResult:
        return self._sdk.should_sample(parent_context, trace_id, name, kind, attributes,
                                       links, trace_state)

    def get_description(self) -> str:
        return self._sdk.get_description()


def sampler_from(environ: Mapping[str, str]) -> StandardSampler:
    """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, refused clearly when wrong."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    ratio = 1.0
    if name.endswith("traceidratio"):
        raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TelemetryError(f"environment OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a "
                                 "ratio from 0 to 1")
    return StandardSampler(name, ratio)


def _otlp_protocol(environ: Mapping[str, str], signal: str) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    protocol = environ.get(variable) or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip().lower()
    if protocol not in _OTLP_PROTOCOLS:
        raise TelemetryError(f"environment {variable} / OTEL_EXPORTER_OTLP_PROTOCOL: "
                             f"{protocol!r} is not one of {', '.join(_OTLP_PROTOCOLS)}")
    return protocol


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    # Imported on demand: each exporter pulls in its transport (grpc or requests).
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    # the OTLP exporters that also send call spans written directly (otlp_export)
    from creditline.observability.otlp_export import (
        EncodedGrpcSpanExporter,
        EncodedHttpSpanExporter,
    )
    if _otlp_protocol(environ, "TRACES") == "grpc":
        return EncodedGrpcSpanExporter()
    return EncodedHttpSpanExporter()


def _metric_reader(name: str, environ: Mapping[str, str]) -> MetricReader:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if _otlp_protocol(environ, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )
        return PeriodicExportingMetricReader(GrpcMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )
    return PeriodicExportingMetricReader(HttpMetricExporter())


def _resource(environ: Mapping[str, str]) -> Resource:
    """The resource: service.name from OTEL_SERVICE_NAME, else from OTEL_RESOURCE_ATTRIBUTES,
    else creditline. Resource.create reads both variables itself, but from the process's
    environment: the name is passed explicitly so that `environ` decides it (attributes
    passed override what it reads)."""
    service_name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if service_name:
        return Resource.create({"service.name": service_name})
    listed = environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    if any(item.partition("=")[0].strip() == "service.name" for item in listed):
        return Resource.create()
    return Resource.create({"service.name": DEFAULT_SERVICE_NAME})


# The most rating-group ids one span lists (a request may carry more; it is then refused).
MAX_SPAN_RATING_GROUPS = 64
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
# The parent of a call that brought no trace context: none (the call's span is a root),
# given explicitly so that the sampler does not look for one in the current context.
_NO_PARENT = TraceContext()
_getrandbits = random.getrandbits


# A finished child of a call span (rating, a Redis script), made into a span with the
# call's: name, kind, attributes, start and end (ns since the epoch), status, events (an
# error's, if it raised one).
ChildSpan = tuple[str, SpanKind, Mapping[str, Any], int, int, Status, tuple[Event, ...]]


@dataclass(slots=True)
class CallSpan:
    """The span of one sampled call, kept as plain values while the call runs, with its
    finished children; CallSpanExporter makes it into SDK spans when it is exported."""

    name: str
    context: SpanContext
    parent: SpanContext | None
    start_ns: int
    # the method's attributes, shared by all its calls (never written); the request's and
    # the answer's are added when the span is made
    base_attributes: Mapping[str, Any]
    children: list[ChildSpan] = field(default_factory=list)
    # set by SpanRecorder.end_call
    end_ns: int = 0
    request: Any = None
    response: Any = None
    grpc_status_code: int = 0
    status: Status = _UNSET
    events: tuple[Event, ...] = ()


# The sampled call span of the running call (each gRPC call runs in a task of its own, so
# in a context of its own). Its children find it with this one read, where the OTel API
# takes four Python calls (get_current_span, get_value, get_current, the ContextVar).
_CURRENT_CALL: ContextVar[CallSpan | None] = ContextVar("creditline_call_span", default=None)


def current_call() -> CallSpan | None:
    """The sampled call span of the running call; None outside one or when sampled out."""
    return _CURRENT_CALL.get()


def add_child(call: CallSpan, name: str, kind: SpanKind, attributes: Mapping[str, Any],
              start_ns: int, error: BaseException | None = None) -> None:
    """A child of `call` that started at start_ns and ends now."""
    end_ns = time.time_ns()
    if error is None:
        call.children.append((name, kind, attributes, start_ns, end_ns, _UNSET, ()))
    else:
        call.children.append((name, kind, attributes, start_ns, end_ns,
                              _error_status(error), _error_events(error, end_ns)))


class SpanRecorder:
    """Records the server's own call spans (CallSpan, with their children) and hands them
    to span processors whose exporters are CallSpanExporters (Telemetry.use_tracing builds
    them so), which make them into SDK spans (ReadableSpan): every exporter, sampler and
    batch setting works as usual.

    Why not the SDK's Tracer: its live Span (locks, attribute limits and cleaning, span
    start hooks, self-metrics) costs about 8 times what a ReadableSpan made at once does
    (measured: 63 us against 8 us for a span with two attributes on this machine), and a
    charging call makes three spans; the tracing overhead goal (100% sampling >= 0.9 of the
    throughput without tracing) cannot be met with it. What this gives up: span limits (the
    attributes here are few and bounded), on_start hooks (the batch and simple processors
    have none), and live spans for other code (they parent on the current span context as
    usual).

    Why the spans are made in the exporter: timed in the running server
    (bench/tracing_overhead.py --sections) each step of the span path costs 2-4 times its
    figure in a tight loop, where the code stays in the CPU's caches. Behind the batch
    processor the exporter runs in its own thread, a batch of calls at a time: making the
    SDK spans, their ids and their attributes there costs the tight loop's figure, and
    nothing on the call's path. What the call's path does: two ids, the sampler's rule, a
    SpanContext, and a tuple per child.

    The call span is the current call of its children (current_call()), not the OTel
    API's current span: attaching it to the OTel context cost ~8 us per call in the server,
    and nothing inside a call reads it (no tracer provider is set globally, so no other
    library records spans here); the log records' trace ids read current_call().
    """

    def __init__(self, sampler: Sampler, processors: Sequence[SpanProcessor]) -> None:
        self._sampler = sampler
        self._standard = sampler if isinstance(sampler, StandardSampler) else None
        # each takes a CallSpan, which its CallSpanExporter makes into SDK spans
        self._on_end: list[Callable[[Any], None]] = [processor.on_end
                                                     for processor in processors]

    def start_call(self, name: str, parent: TraceContext | None,
                   base_attributes: Mapping[str, Any]) -> CallSpan | None:
        """A SERVER span, child of the caller's trace when it sent one; None when the
        sampler drops it (then nothing at all is recorded for the call). The attributes
        are kept, not copied: they must not change."""
        parent_span = None
        if parent is not None:
            parent_span = trace.get_current_span(parent).get_span_context()
            if not parent_span.is_valid:
                parent_span = None
        trace_id = _random_id(128) if parent_span is None else parent_span.trace_id
        if self._standard is not None:  # the standard samplers' rules, without the SDK call
            if not self._standard.samples(trace_id, parent_span):
                return None
            trace_state = None if parent_span is None else parent_span.trace_state
        else:
            decision = self._sampler.should_sample(
                _NO_PARENT if parent is None else parent, trace_id, name, SpanKind.SERVER,
                base_attributes)
            if decision.decision is not Decision.RECORD_AND_SAMPLE:
                return None
            trace_state = decision.trace_state
        context = SpanContext(trace_id, _random_id(64), False, _SAMPLED, trace_state)
        return CallSpan(name, context, parent_span, time.time_ns(), base_attributes)

    @staticmethod
    def enter(call: CallSpan) -> Token[CallSpan | None]:
        """Makes the call span the current call (for its children and the log records'
        trace ids); leave() undoes it."""
        return _CURRENT_CALL.set(call)

    @staticmethod
    def leave(token: Token[CallSpan | None]) -> None:
        _CURRENT_CALL.reset(token)

    def end_call(self, call: CallSpan, request: Any, response: Any, grpc_status_code: int,
                 status: Status | None = None, error: BaseException | None = None) -> None:
        """Ends the call span and hands it, with its children, to the processors; its
        request and answer (None if none) give the rest of its attributes when it is
        made (call_attributes): neither may change after the call."""
        call.end_ns = end_ns = time.time_ns()
        call.request = request
        call.response = response
        call.grpc_status_code = grpc_status_code
        if status is not None:
            call.status = status
        if error is not None:
            call.events = _error_events(error, end_ns)
        for on_end in self._on_end:
            on_end(call)


_ID_ATTRIBUTES = (("account_id", "creditline.account_id"),
                  ("session_id", "creditline.session_id"))


def request_attributes(call: CallSpan) -> list[tuple[str, Any]]:
    """The call's attributes beyond its method's: its request's ids, request number and
    rating groups (those it has), its gRPC status and its answer's result code."""
    request = call.request
    attributes: list[tuple[str, Any]] = []
    for field_name, attribute in _ID_ATTRIBUTES:
        value = getattr(request, field_name, None)
        if value:
            attributes.append((attribute, value))
    request_number = getattr(request, "request_number", None)
    if request_number is not None:
        attributes.append(("creditline.request_number", request_number))
    blocks = getattr(request, "rating_groups", None)
    if blocks:
        attributes.append(("creditline.rating_groups", [
            block.rating_group for block in blocks[:MAX_SPAN_RATING_GROUPS]]))
    attributes.append(("rpc.grpc.status_code", call.grpc_status_code))
    result_code = getattr(call.response, "result_code", None)
    if result_code is not None:
        attributes.append(("creditline.result_code", int(result_code)))
    return attributes


def call_attributes(call: CallSpan) -> dict[str, Any]:
    """The call's attributes: its method's, then request_attributes (never the same
    keys)."""
    attributes = dict(call.base_attributes)
    attributes.update(request_attributes(call))
    return attributes


class CallSpanExporter(SpanExporter):
    """Wraps an exporter so that it also takes the server's call spans (CallSpan). Behind
    a BatchSpanProcessor this runs in its export thread (see SpanRecorder for why), and its
    sizes (OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE) count calls, each one
    span and one per child.

    An OTLP exporter (one with `export_encoded`, otlp_export) gets the calls' spans
    written directly as one OTLP request (otlp_encoding.CallEncoder: 16 us per call
    against 65 us through SDK spans and the SDK's encoder), and any other spans as usual.
    Any other exporter gets each call made into its SDK spans (its children's, then its
    own), in order with the other spans."""

    def __init__(self, exporter: SpanExporter, resource: Resource) -> None:
        self.exporter = exporter
        self._resource = resource
        self._scope = InstrumentationScope(INSTRUMENTATION_NAME)
        # an OTLP exporter's way in for written requests, and the writer: None otherwise
        export_encoded: Callable[[bytes, int], SpanExportResult] | None = getattr(
            exporter, "export_encoded", None)
        self._written = None if export_encoded is None else (CallEncoder(
            resource, INSTRUMENTATION_NAME, request_attributes, _new_span_id), export_encoded)

    def export(self, spans: Sequence[ReadableSpan | CallSpan]) -> SpanExportResult:
        if self._written is None:
            return self.exporter.export(self._made(spans))
        encoder, export_encoded = self._written
        calls = [span for span in spans if isinstance(span, CallSpan)]
        others = [span for span in spans if not isinstance(span, CallSpan)]
        results = []
        if calls:
            results.append(export_encoded(encoder.request(calls), len(calls)))
        if others:
            results.append(self.exporter.export(others))
        failed = any(result is not SpanExportResult.SUCCESS for result in results)
        return SpanExportResult.FAILURE if failed else SpanExportResult.SUCCESS

    def _made(self, spans: Sequence[ReadableSpan | CallSpan]) -> list[ReadableSpan]:
        """The spans, each call made into its SDK spans in its place."""
        finished: list[ReadableSpan] = []
        for span in spans:
            if isinstance(span, CallSpan):
                finished += self._spans_of(span)
            else:
                finished.append(span)
        return finished

    def _spans_of(self, call: CallSpan) -> list[ReadableSpan]:
        context = call.context
        resource, scope = self._resource, self._scope
        # ReadableSpan's arguments by position, in the SDK's order (name, context, parent,
        # resource, attributes, events, links, kind, instrumentation_info, status, start,
        # end, scope): by keyword the call costs twice as much (1.2 against 0.6 us)
        spans = [ReadableSpan(
            name, SpanContext(context.trace_id, _random_id(64), False, _SAMPLED,
                              context.trace_state),
            context, resource, attributes, events, (), kind, None, status, start_ns, end_ns,
            scope)
            for name, kind, attributes, start_ns, end_ns, status, events in call.children]
        spans.append(ReadableSpan(
            call.name, context, call.parent, resource, call_attributes(call), call.events,
            (), SpanKind.SERVER, None, call.status, call.start_ns, call.end_ns, scope))
        return spans

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _error_status(error: BaseException) -> Status:
    return Status(StatusCode.ERROR, type(error).__name__)


def _error_events(error: BaseException | None, at_ns: int) -> tuple[Event, ...]:
    if error is None:
        return ()
    return (Event("exception", {"exception.type": type(error).__qualname__,
                                "exception.message": str(error)}, at_ns),)


def _new_span_id() -> int:
    return _random_id(64)


def _random_id(bits: int) -> int:
    value = _getrandbits(bits)
    while value == 0:  # 0 is the invalid id
        value = _getrandbits(bits)
    return value


class Metrics:
    """The server's instruments.

    - creditline.rpc.requests {request}: calls by rpc.service, rpc.method,
      rpc.grpc.status_code and creditline.result_code (the Diameter code; 0 for Admin)
    - rpc.server.call.duration s: call latency by rpc.service, rpc.method, status
    - creditline.units.granted {unit}: granted units by rating group and unit
      (time_s, total_octets, service_specific_units)
    - creditline.charged micro-units: money charged by rating group and rpc.method
    - creditline.redis.script.duration s: one Lua script call, by script
    - creditline.accounts {account}: subscriber accounts in Redis (refreshed every
      metrics_accounts_interval_s)
    - creditline.notification.subscribers {stream}: open notification streams (a hook for
      the Subscribe stream: `notification_subscribers.add(+1 / -1)`)
    - creditline.cdr.backlog {record}: CDRs not yet exported (a hook: `cdr_backlog_source`)
    """

    def __init__(self, meter: Meter) -> None:
        self.requests = meter.create_counter(
            "creditline.rpc.requests", unit="{request}", description="gRPC calls answered")
        self.duration = meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="gRPC call latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.granted_units = meter.create_counter(
            "creditline.units.granted", unit="{unit}", description="units granted")
        self.charged_micros = meter.create_counter(
            "creditline.charged", unit="{micro}", description="money charged, micro-units")
        self.redis_duration = meter.create_histogram(
            "creditline.redis.script.duration", unit="s",
            description="latency of one Redis script call",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.notification_subscribers = meter.create_up_down_counter(
            "creditline.notification.subscribers", unit="{stream}",
            description="open notification streams")
        self.accounts: int | None = None
        self.cdr_backlog_source: Callable[[], int] | None = None
        meter.create_observable_gauge(
            "creditline.accounts", callbacks=[self._observe_accounts], unit="{account}",
            description="subscriber accounts")
        meter.create_observable_gauge(
            "creditline.cdr.backlog", callbacks=[self._observe_cdr_backlog],
            unit="{record}", description="charging data records not yet exported")

    def _observe_accounts(self, options: CallbackOptions) -> Iterable[Observation]:
        return [] if self.accounts is None else [Observation(self.accounts)]

    def _observe_cdr_backlog(self, options: CallbackOptions) -> Iterable[Observation]:
        source = self.cdr_backlog_source
        return [] if source is None else [Observation(source())]


@dataclass
class Telemetry:
    """What the server observes with; every part is None when it is switched off."""

    tracer: Tracer | None = None
    spans: SpanRecorder | None = None
    metrics: Metrics | None = None
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    prometheus_port: int = 0
    _prometheus: tuple[WSGIServer, Thread] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def use_tracing(self, sampler: Sampler, exporters: Sequence[SpanExporter],
                    resource: Resource | None = None, *, batched: bool = True,
                    max_queue_size: int | None = None) -> None:
        """Traces to these exporters, each behind a BatchSpanProcessor (OTEL_BSP_*
        settings; max_queue_size, given, overrides its queue's size) or, not batched, a
        SimpleSpanProcessor that exports each span as it ends (tests). The processors are
        shut down with the provider."""
        provider = TracerProvider(resource=resource or Resource.create(), sampler=sampler)
        processors: list[SpanProcessor] = []
        for exporter in exporters:
            calls_too = CallSpanExporter(exporter, provider.resource)
            processors.append(BatchSpanProcessor(calls_too, max_queue_size=max_queue_size)
                              if batched else SimpleSpanProcessor(calls_too))
            provider.add_span_processor(processors[-1])
        self.tracer_provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        self.spans = SpanRecorder(sampler, processors)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None or self.metrics is not None

    def script_instrument(self) -> ScriptInstrument | None:
        if not self.enabled:
            return None
        return ScriptInstrument(self.metrics)

    def traced_rater(self, rater: Rater) -> Rater:
        return rater if self.spans is None else TracedRater(rater)

    def start_account_gauge(self, redis: RedisClient, interval_s: float,
                            cdr_streams: Sequence[str] = (),
                            account_indexes: Sequence[str] = ()) -> None:
        """Counts the accounts (the partitions' indexes of account ids) and the CDR
        backlog (the CDR streams' lengths: the exporter deletes what it has exported)
        every interval."""
        if self.metrics is not None:
            self._tasks.append(asyncio.create_task(_count_accounts_every(
                redis, self.metrics, interval_s, cdr_streams, account_indexes)))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._prometheus is not None:
            server, thread = self._prometheus
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._prometheus = None
        # Flushes what is batched; the exporters bound their own timeouts.
        if self.tracer_provider is not None:
            await asyncio.to_thread(self.tracer_provider.shutdown)
        if self.meter_provider is not None:
            await asyncio.to_thread(self.meter_provider.shutdown)


def build_telemetry(
    settings: Settings, environ: Mapping[str, str], *,
    span_exporter: SpanExporter | None = None, sampler: Sampler | None = None,
    metric_reader: MetricReader | None = None,
) -> Telemetry:
    """Telemetry from the settings and OTEL_* variables. Tests pass an in-memory
    span exporter or metric reader, which replaces the configured exporters."""
    telemetry = Telemetry()
    if sdk_disabled(environ) and span_exporter is None and metric_reader is None:
        return telemetry
    resource = _resource(environ)
    trace_names = _names(environ, "OTEL_TRACES_EXPORTER", _TRACE_EXPORTERS)
    chosen_sampler = sampler or sampler_from(environ)
    if span_exporter is not None:
        telemetry.use_tracing(chosen_sampler, [span_exporter], resource, batched=False)
    elif trace_names:
        telemetry.use_tracing(chosen_sampler,
                              [_span_exporter(name, environ) for name in trace_names],
                              resource)

    readers: list[MetricReader] = []
    if metric_reader is not None:
        readers.append(metric_reader)
    else:
        metric_names = _names(environ, "OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS)
        readers += [_metric_reader(name, environ) for name in metric_names
                    if name != "prometheus"]
        address = settings.metrics_listen_address
        if not address and "prometheus" in metric_names:
            address = "127.0.0.1:9464"
        if address:
            reader, telemetry._prometheus = _prometheus_endpoint(address)
            telemetry.prometheus_port = telemetry._prometheus[0].server_port
            readers.append(reader)
    if readers:
        telemetry.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        telemetry.metrics = Metrics(telemetry.meter_provider.get_meter(INSTRUMENTATION_NAME))
    return telemetry


def _prometheus_endpoint(address: str) -> tuple[MetricReader, tuple[WSGIServer, Thread]]:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    # A registry of its own: the process-wide default would mix several servers (tests).
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    host, _, port = address.rpartition(":")
    try:
        server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except (OSError, ValueError) as error:
        raise ValueError(f"setting metrics_listen_address: cannot listen on {address}: "
                         f"{error}") from None
    return reader, (server, thread)


async def _count_accounts_every(redis: RedisClient, metrics: Metrics, interval_s: float,
                                cdr_streams: Sequence[str], account_indexes: Sequence[str]
                                ) -> None:
    """Counts the accounts (SCARD of each partition's index) now and then."""
    while True:
        try:
            count = 0
            for index in account_indexes:
                count += int(await redis.scard(index))
            metrics.accounts = count
            backlog = 0
            for stream in cdr_streams:
                backlog += int(await redis.xlen(stream))
            metrics.cdr_backlog_source = (lambda value=backlog: value) if cdr_streams else None
        except Exception as error:  # a metric must never stop the server
            log.warning("counting accounts failed: %r", error)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return  # stopped: a cancel inside a Redis call can come out as another error
        await asyncio.sleep(interval_s)


class ScriptInstrument:
    """A child span (kind CLIENT) and a latency sample around one Redis script call."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        # per script (two of them): span name, span attributes and metric attributes,
        # made once and shared by every call (spans and metrics only read them)
        self._labels: dict[tuple[str, str], tuple[str, dict[str, Any], dict[str, Any]]] = {}

    def run(self, script: str, call: Awaitable[T], operation: str = "EVALSHA"
            ) -> Awaitable[T]:
        """The call itself when there is nothing to record (a sampled-out call and no
        metrics): it then costs no extra coroutine, clock read or span. The span is a
        child of the running call's, when that is sampled. operation: EVALSHA or FCALL."""
        parent = _CURRENT_CALL.get()
        if parent is None and self._metrics is None:
            return call
        labels = self._labels.get((operation, script)) or self._new_labels(operation, script)
        return self._timed(labels, call, parent)

    def _new_labels(self, operation: str, script: str
                    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        labels = (f"{operation} {script}",
                  {"db.system.name": "redis", "db.operation.name": operation,
                   "creditline.script": script},
                  {"creditline.script": script})
        self._labels[(operation, script)] = labels
        return labels

    async def _timed(self, labels: tuple[str, dict[str, Any], dict[str, Any]],
                     call: Awaitable[T], parent: CallSpan | None) -> T:
        start_ns = time.time_ns()  # the span's clock: wall time
        start_s = time.perf_counter()  # the latency's: monotonic
        error: BaseException | None = None
        try:
            return await call
        except BaseException as raised:
            error = raised
            raise
        finally:
            if parent is not None:
                add_child(parent, labels[0], SpanKind.CLIENT, labels[1], start_ns, error)
            if self._metrics is not None:
                self._metrics.redis_duration.record(time.perf_counter() - start_s,
                                                    labels[2])


class TracedRater:
    """The rater with a child span per rated tariff (the rate table it builds)."""

    def __init__(self, rater: Rater) -> None:
        self._rater = rater
        # each rating group's span attributes, made once and shared by its spans (never
        # written; the OTLP writer keeps the encoding of shared attributes)
        self._attributes: dict[int, dict[str, Any]] = {}

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable:
        parent = _CURRENT_CALL.get()
        if parent is None:
            return self._rater.rate_table(tariff, event_time_unix_ms, lookback_s, period)
        start_ns = time.time_ns()
        try:
            return self._rater.rate_table(tariff, event_time_unix_ms, lookback_s, period)
        finally:
            rating_group = tariff.rating_group
            attributes = self._attributes.get(rating_group)
            if attributes is None:
                attributes = self._attributes[rating_group] = {
                    "creditline.rating_group": rating_group}
            add_child(parent, "rating", SpanKind.INTERNAL, attributes, start_ns)

    def fixed_table(self, tariff: Tariff) -> RateTable | None:
        # none made ahead: every rating is asked per request, a span of its call
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rater, name)


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the running call's span, else of the OTel API's
    current span, for log records."""
    call = _CURRENT_CALL.get()
    context = (trace.get_current_span().get_span_context() if call is None
               else call.context)
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
