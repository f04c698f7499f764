"""OpenTelemetry for the server, on the SDK's standard path: traces and metrics, chosen by
the standard OTEL_* environment variables, built once from the settings and passed
explicitly (no global tracer or meter provider is set).

Traces: OTEL_TRACES_EXPORTER = none (the default here) | otlp | console (comma list),
each behind the SDK's BatchSpanProcessor (OTEL_BSP_* settings); OTLP spans through
otlp_traces.OtlpSpanExporter (the stock exporters' encoder was the largest cost of a
sampled call), OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL = http/protobuf (default) | grpc;
endpoints, headers and timeouts as the stock OTLP exporters read them
(OTEL_EXPORTER_OTLP_ENDPOINT, ...);
OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on), made into
the SDK's sampler classes; OTEL_SERVICE_NAME (default creditline) and
OTEL_RESOURCE_ATTRIBUTES; OTEL_SDK_DISABLED=true turns everything off. With no exporter
the server builds no tracer at all: the call path then creates no span and pays nothing.

Metrics: OTEL_METRICS_EXPORTER = none (default) | otlp | console | prometheus, and the
setting metrics_listen_address, which serves a Prometheus scrape endpoint (implies
prometheus). OTLP and console metrics go out every OTEL_METRIC_EXPORT_INTERVAL ms (the
SDK reads it; 60000 unless set). Instruments: see `Metrics`.
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
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Tracer
from redis.exceptions import ResponseError

from creditline.errors import TelemetryError
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
DEFAULT_SAMPLER = "parentbased_always_on"  # (OpenTelemetry's default)
_METRIC_EXPORTERS = ("none", "otlp", "console", "prometheus")
_OTLP_PROTOCOLS = ("http/protobuf", "grpc")
# OTEL_TRACES_SAMPLER's standard names -> the SDK's sampler, given the ratio (the SDK maps
# them too, but only in a private function)
_SAMPLERS: dict[str, Callable[[float], Sampler]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_always_on": lambda _: ParentBased(ALWAYS_ON),
    "parentbased_always_off": lambda _: ParentBased(ALWAYS_OFF),
    "parentbased_traceidratio": lambda ratio: ParentBased(TraceIdRatioBased(ratio)),
}


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


@dataclass(frozen=True)
class RootSampling:
    """Whether a call with no trace context from its caller (a root) is traced at all,
    decided before the SDK is asked: with OTEL_TRACES_SAMPLER=parentbased_traceidratio, the
    ratio is drawn here and the SDK's sampler is ParentBased(ALWAYS_ON), which samples
    the roots let through and, as ParentBased(TraceIdRatioBased) does, follows a caller's
    sampled flag. The same ratio of roots is traced (a root's trace id is random, so a
    draw by trace id or by random() is the same chance), but a root left out costs no
    span at all. Why: the SDK's start_span for a span it drops runs ~40 Python calls; in a
    server, out of the CPU's caches, `python bench/tracing_overhead.py --rate 600`
    (2026-12-07) measured +51 us of server CPU per call at 1 % (0.93 of off) and +79 us
    at 10 % (0.89), against ~6 us in a tight loop."""

    ratio: float = 1.0
    draws: random.Random = field(default_factory=random.Random, compare=False)
    # the SDK's sampler follows a caller's sampled flag (ParentBased, as every
    # parentbased_* sampler does): a caller's unsampled trace can then be left out here
    # too, with no span at all, where the SDK would make one and drop it
    parent_based: bool = False

    def traced(self) -> bool:
        return self.ratio >= 1.0 or self.draws.random() < self.ratio


def tracing_sampling(environ: Mapping[str, str]) -> tuple[Sampler, RootSampling]:
    """The SDK's sampler and the root sampling ahead of it, for the OTEL_TRACES_SAMPLER
    variables: parentbased_traceidratio drawn ahead (RootSampling), the others by the SDK's
    sampler alone."""
    sampler = sampler_from(environ)
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if name == "parentbased_traceidratio":
        return ParentBased(ALWAYS_ON), RootSampling(_ratio(environ), parent_based=True)
    return sampler, RootSampling(parent_based=name.startswith("parentbased_"))


def _ratio(environ: Mapping[str, str]) -> float:
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryError(f"environment OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a "
                             "ratio from 0 to 1")
    return ratio


def sampler_from(environ: Mapping[str, str]) -> Sampler:
    """OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, refused clearly when wrong."""
    name = environ.get("OTEL_TRACES_SAMPLER", DEFAULT_SAMPLER).strip().lower()
    if name not in _SAMPLERS:
        raise TelemetryError(f"environment OTEL_TRACES_SAMPLER: {name!r} is not one of "
                             f"{', '.join(_SAMPLERS)}")
    return _SAMPLERS[name](_ratio(environ) if name.endswith("traceidratio") else 1.0)


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
    # (ours, not the stock OTLPSpanExporter: otlp_traces.py says why, with the figure)
    from creditline.observability.otlp_traces import otlp_span_exporter
    return otlp_span_exporter(_otlp_protocol(environ, "TRACES"), environ)


def _metric_reader(name: str, environ: Mapping[str, str]) -> MetricReader:
    # (the reader's interval: OTEL_METRIC_EXPORT_INTERVAL, which the SDK reads)
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


class Metrics:
    """The server's instruments (bounded attributes only: no account or session ids).

    - creditline.rpc.requests {request}: calls, and requests carried by Charging.Stream, by
      rpc.service, rpc.method (a Stream's request: Initial, Update, Terminate or Event),
      creditline.transport (unary; stream: over a gRPC stream, the Stream's requests and
      the streaming calls themselves), rpc.grpc.status_code and creditline.result_code
      (the Diameter code; 0 for Admin)
    - rpc.server.call.duration s: latency of a call or of a Stream's request, by the same
      but the result code (streaming calls themselves are not timed: they last for ever)
    - creditline.rpc.in_flight {call}: calls in progress (a stream: while open) by
      rpc.service and rpc.method
    - creditline.stream.in_flight {request}: requests of Charging.Stream in progress
    - creditline.units.granted {unit}: granted units by rating group and unit
      (time_s, total_octets, service_specific_units)
    - creditline.charged micro-units: money charged by rating group and rpc.method
    - creditline.redis.script.duration s: one Lua script call, by script
    - creditline.redis.unable_to_comply {answer}: 5012 answers, by rpc.method and transport
    - creditline.redis.up: 1 if the last Redis call succeeded, 0 if it failed
    - creditline.accounts {account}: subscriber accounts in Redis (refreshed every
      metrics_accounts_interval_s)
    - creditline.notification.subscribers {stream}: open notification streams
    - creditline.events.delivered {event}: charge events written to subscribers, by
      rpc.method (Subscribe, SubscribeBatches)
    - creditline.hub.lag {event}: events this process's event hub has read for a
      subscriber and not yet written to it, the most of any subscriber (`hub_lag_source`)
    - creditline.supervision.closures {session}: sessions this process's supervision
      closed (`closures_source`)
    - creditline.cdr.backlog {record}: CDRs not yet exported (a hook: `cdr_backlog_source`)
    """

    def __init__(self, meter: Meter) -> None:
        self.requests = meter.create_counter(
            "creditline.rpc.requests", unit="{request}", description="gRPC calls answered")
        self.duration = meter.create_histogram(
            "rpc.server.call.duration", unit="s", description="gRPC call latency",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.in_flight = meter.create_up_down_counter(
            "creditline.rpc.in_flight", unit="{call}", description="gRPC calls in progress")
        self.stream_in_flight = meter.create_up_down_counter(
            "creditline.stream.in_flight", unit="{request}",
            description="requests of Charging.Stream in progress")
        self.stream_in_flight.add(0)  # (it has no attributes: shown at 0 before any stream)
        self.granted_units = meter.create_counter(
            "creditline.units.granted", unit="{unit}", description="units granted")
        self.charged_micros = meter.create_counter(
            "creditline.charged", unit="{micro}", description="money charged, micro-units")
        self.redis_duration = meter.create_histogram(
            "creditline.redis.script.duration", unit="s",
            description="latency of one Redis script call",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.unable_to_comply = meter.create_counter(
            "creditline.redis.unable_to_comply", unit="{answer}",
            description="answers with result code 5012 (DIAMETER_UNABLE_TO_COMPLY)")
        self.notification_subscribers = meter.create_up_down_counter(
            "creditline.notification.subscribers", unit="{stream}",
            description="open notification streams")
        self.events_delivered = meter.create_counter(
            "creditline.events.delivered", unit="{event}",
            description="charge events written to subscribers")
        # read by the observable instruments when a reader collects
        self.accounts: int | None = None
        self.redis_up: int | None = None
        self.cdr_backlog_source: Callable[[], int] | None = None
        self.hub_lag_source: Callable[[], int] | None = None
        self.closures_source: Callable[[], int] | None = None
        self._observe(meter)

    def _observe(self, meter: Meter) -> None:
        meter.create_observable_gauge(
            "creditline.accounts", callbacks=[self._observer(lambda: self.accounts)],
            unit="{account}", description="subscriber accounts")
        meter.create_observable_gauge(
            "creditline.redis.up", callbacks=[self._observer(lambda: self.redis_up)],
            description="1 if the last Redis call succeeded, 0 if it failed")
        meter.create_observable_gauge(
            "creditline.cdr.backlog", callbacks=[self._source(lambda: self.cdr_backlog_source)],
            unit="{record}", description="charging data records not yet exported")
        meter.create_observable_gauge(
            "creditline.hub.lag", callbacks=[self._source(lambda: self.hub_lag_source)],
            unit="{event}", description="events read for a subscriber, not yet written")
        meter.create_observable_counter(
            "creditline.supervision.closures",
            callbacks=[self._source(lambda: self.closures_source)], unit="{session}",
            description="sessions closed by supervision")

    @staticmethod
    def _observer(value: Callable[[], int | None]
                  ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            now = value()
            return [] if now is None else [Observation(now)]
        return observe

    @classmethod
    def _source(cls, source: Callable[[], Callable[[], int] | None]
                ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def value() -> int | None:
            read = source()
            return None if read is None else read()
        return cls._observer(value)


@dataclass
class Telemetry:
    """What the server observes with; every part is None when it is switched off."""

    tracer: Tracer | None = None
    root_sampling: RootSampling = field(default_factory=RootSampling)
    metrics: Metrics | None = None
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    prometheus_port: int = 0
    _prometheus: tuple[WSGIServer, Thread] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def use_tracing(self, sampler: Sampler, exporters: Sequence[SpanExporter],
                    resource: Resource | None = None, *, batched: bool = True,
                    root_sampling: RootSampling | None = None) -> None:
        """Traces to these exporters, each behind a BatchSpanProcessor (OTEL_BSP_*
        settings) or, not batched, a SimpleSpanProcessor that exports each span as it
        ends (tests). The processors are shut down with the provider. root_sampling:
        what is drawn ahead of the sampler (tracing_sampling)."""
        provider = TracerProvider(resource=resource or Resource.create(), sampler=sampler)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter) if batched
                                        else SimpleSpanProcessor(exporter))
        self.tracer_provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME)
        self.root_sampling = root_sampling or RootSampling()

    @property
    def enabled(self) -> bool:
        return self.tracer is not None or self.metrics is not None

    def script_instrument(self) -> ScriptInstrument | None:
        if not self.enabled:
            return None
        return ScriptInstrument(self.metrics)

    def traced_rater(self, rater: Rater) -> Rater:
        return rater if self.tracer is None else TracedRater(rater, self.tracer)

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
    chosen_sampler, roots = (sampler, RootSampling()) if sampler else tracing_sampling(environ)
    if span_exporter is not None:
        telemetry.use_tracing(chosen_sampler, [span_exporter], resource, batched=False,
                              root_sampling=roots)
    elif trace_names:
        telemetry.use_tracing(chosen_sampler,
                              [_span_exporter(name, environ) for name in trace_names],
                              resource, root_sampling=roots)
    readers: list[MetricReader] = [metric_reader] if metric_reader is not None else []
    if metric_reader is None:
        readers, telemetry._prometheus = _metric_readers(settings, environ)
        if telemetry._prometheus is not None:
            telemetry.prometheus_port = telemetry._prometheus[0].server_port
    if readers:
        telemetry.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        telemetry.metrics = Metrics(telemetry.meter_provider.get_meter(INSTRUMENTATION_NAME))
    return telemetry


def _metric_readers(settings: Settings, environ: Mapping[str, str]
                    ) -> tuple[list[MetricReader], tuple[WSGIServer, Thread] | None]:
    """The readers OTEL_METRICS_EXPORTER names, with a Prometheus one serving
    metrics_listen_address (default 127.0.0.1:9464 when only the variable names it), and
    that endpoint's server."""
    metric_names = _names(environ, "OTEL_METRICS_EXPORTER", _METRIC_EXPORTERS)
    readers = [_metric_reader(name, environ) for name in metric_names if name != "prometheus"]
    address = settings.metrics_listen_address
    if not address and "prometheus" in metric_names:
        address = "127.0.0.1:9464"
    if not address:
        return readers, None
    reader, endpoint = _prometheus_endpoint(address)
    return [*readers, reader], endpoint


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
    """Counts the accounts (SCARD of each partition's index) now and then; whether it
    could also says whether Redis is up while no call comes."""
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
            metrics.redis_up = 1
        except Exception as error:  # a metric must never stop the server
            metrics.redis_up = 0
            log.warning("counting accounts failed: %r", error)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return  # stopped: a cancel inside a Redis call can come out as another error
        await asyncio.sleep(interval_s)


# The attributes a sampled call's span gets for its Redis script calls (in place of a
# child span per call: a child span cost ~35 % of a sampled call's tracing work,
# `python bench/tracing_overhead.py`'s loop, 2026-12-07: 85 -> 51 us at 100 %)
REDIS_CALLS_ATTRIBUTE = "creditline.redis.calls"
REDIS_DURATION_ATTRIBUTE = "creditline.redis.duration_s"


@dataclass(slots=True)
class CallRecord:
    """A sampled call's span and its attributes, gathered while it runs (its method's and
    request's, then its answer's) with the count and time of its Redis script calls, and
    set on the span once, when it ends. Why once: the SDK checks each mapping it is given
    as a whole, then each value, under a lock; set at the start, at the end and per
    script call (with a read-back to sum them), they were ~40 % of a sampled call's work
    in the server's process (cProfile of bench/tracing_overhead.py's loop, 2026-12-07)."""

    span: Span
    attributes: dict[str, Any]
    redis_calls: int = 0
    redis_duration_s: float = 0.0

    def end_attributes(self, answer: Mapping[str, Any]) -> dict[str, Any]:
        """The attributes gathered, the answer's, and the Redis ones when the call made a
        script call."""
        attributes = self.attributes
        attributes.update(answer)
        if self.redis_calls:
            attributes[REDIS_CALLS_ATTRIBUTE] = self.redis_calls
            attributes[REDIS_DURATION_ATTRIBUTE] = self.redis_duration_s
        return attributes


# The running call's CallRecord, None outside a sampled call; set by the call wrapper with
# the OTel context it makes current. A variable of its own: it is read on every Redis call
# of every call, sampled or not, and a read through the OTel context's get_value took
# ~270 ns, this one ~40 ns.
_call_record: ContextVar[CallRecord | None] = ContextVar("creditline_call_record",
                                                         default=None)


def current_call_record() -> CallRecord | None:
    """The running call's record when it is sampled (a span is recorded); else None."""
    return _call_record.get()


def set_call_record(record: CallRecord | None) -> Token[CallRecord | None]:
    return _call_record.set(record)


def reset_call_record(token: Token[CallRecord | None]) -> None:
    _call_record.reset(token)


class ScriptInstrument:
    """Times one Redis script call: a latency sample, whether Redis is up, and on a sampled
    call's span the count and time of its script calls (a failed one: its exception)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        # what a caller reads to skip run() itself on a call with nothing to record (only
        # tracing on, the call left out): `times_every_call or records.get() is not None`
        # says whether run() would time it. Why: run()'s Python call was ~1k instructions
        # of a left-out call's (see CallWrapper._for_call)
        self.times_every_call = metrics is not None
        self.records = _call_record
        # per script (a few): the metric attributes, made once and shared by every call
        self._labels: dict[tuple[str, str], dict[str, Any]] = {}

    def run(self, script: str, call: Awaitable[T], operation: str = "EVALSHA"
            ) -> Awaitable[T]:
        """The call itself when there is nothing to record (a sampled-out call and no
        metrics): it then costs no extra coroutine or clock read. operation: EVALSHA or
        FCALL."""
        record = self.records.get()  # (None without a tracer: nothing sets it then)
        if record is None and not self.times_every_call:
            return call  # (the test a caller may make itself: see __init__)
        labels = self._labels.get((operation, script)) or self._new_labels(operation, script)
        return self._timed(labels, call, record)

    def _new_labels(self, operation: str, script: str) -> dict[str, Any]:
        labels = {"creditline.script": script}
        self._labels[(operation, script)] = labels
        return labels

    async def _timed(self, labels: dict[str, Any], call: Awaitable[T],
                     record: CallRecord | None) -> T:
        start_s = time.perf_counter()
        metrics = self._metrics
        try:
            result = await call
        except Exception as error:
            if record is not None:
                record.span.record_exception(error)
            if metrics is not None and not isinstance(error, ResponseError):
                metrics.redis_up = 0  # (a script's own error is an answer: Redis is up)
            raise
        finally:
            if record is not None:
                record.redis_calls += 1
                record.redis_duration_s += time.perf_counter() - start_s
        if metrics is not None:
            metrics.redis_up = 1
            metrics.redis_duration.record(time.perf_counter() - start_s, labels)
        return result


class TracedRater:
    """The rater with a child span per rated tariff (the rate table it builds)."""

    def __init__(self, rater: Rater, tracer: Tracer) -> None:
        self._rater = rater
        self._tracer = tracer
        # each rating group's span attributes, made once and shared by its spans
        self._attributes: dict[int, dict[str, Any]] = {}

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable:
        rating_group = tariff.rating_group
        attributes = self._attributes.get(rating_group)
        if attributes is None:
            attributes = self._attributes[rating_group] = {
                "creditline.rating_group": rating_group}
        span = None if current_call_record() is None else \
            self._tracer.start_span("rating", kind=SpanKind.INTERNAL, attributes=attributes)
        try:
            return self._rater.rate_table(tariff, event_time_unix_ms, lookback_s, period)
        finally:
            if span is not None:
                span.end()

    def fixed_table(self, tariff: Tariff) -> RateTable | None:
        # the inner rater's: a tariff whose table is made once is not rated per request,
        # so it has no rating span. (Made None here, every call rated its fixed tariffs
        # again: 1 % sampling cost 9 % of the throughput, bench/tracing_overhead.py.)
        return self._rater.fixed_table(tariff)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rater, name)


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the OTel context's current span, for log records;
    None outside a sampled one (its trace is nowhere to be found)."""
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")
