"""The OTLP span exporters (OTLP/gRPC and OTLP/HTTP): the SDK's SpanExporter interface, the
spans encoded by native/otlp_spans.pyx (or its pure twin) and sent as opentelemetry-proto's
ExportTraceServiceRequest.

Why our own and not the stock OTLPSpanExporter: the stock exporters encode with the stock
encoder and have no public way to send bytes encoded otherwise; that encoder was the
largest part of a sampled call's cost (figures in native/otlp_spans_py.py's docstring;
`python bench/tracing_overhead.py`). Everything else is the SDK's: its tracer, spans,
samplers and BatchSpanProcessor, which calls export() from its own thread. Metrics go
through the stock OTLP metric exporters (encoded once per export interval, not per call).

Configured as the stock exporters are, by the OTLP exporter variables (the signal's own
OTEL_EXPORTER_OTLP_TRACES_* before OTEL_EXPORTER_OTLP_*):
- ENDPOINT: gRPC `http(s)://host:port` (default http://localhost:4317; without a scheme,
  INSECURE=true says plaintext); HTTP the generic endpoint + /v1/traces, or the traces
  endpoint as given (default http://localhost:4318/v1/traces);
- HEADERS `key=value,...` (URL-encoded values), TIMEOUT in seconds (default 10, as the
  Python exporters read it), COMPRESSION gzip | none (HTTP also deflate), CERTIFICATE,
  CLIENT_KEY and CLIENT_CERTIFICATE (PEM files).
A failed export is retried while it may succeed (gRPC UNAVAILABLE and the other transient
codes, HTTP 408, 429 and 5xx, a refused connection) with exponential backoff, within the
timeout; then its spans are dropped with one warning, as the stock exporters do.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlparse

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from creditline.charging.kernels import select_compiled
from creditline.errors import TelemetryError
from creditline.native import otlp_spans_py

log = logging.getLogger(__name__)

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
HTTP_TRACES_PATH = "/v1/traces"
DEFAULT_TIMEOUT_S = 10.0
FIRST_BACKOFF_S = 1.0
COMPILED_ENCODER = "the compiled OTLP span encoder (creditline.native.otlp_spans)"
_TRUE = {"1", "true", "yes", "on"}
# gRPC codes worth another try (OTLP's specification: the ones the server may get past)
RETRYABLE_CODES = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})
RETRYABLE_HTTP = frozenset({408, 429})


class SpanEncoder(Protocol):
    def encode_spans(self, spans: Sequence[ReadableSpan]) -> bytes: ...


def pure_span_encoder() -> SpanEncoder:
    return otlp_spans_py


def compiled_span_encoder() -> SpanEncoder:
    """The compiled encoder; ImportError when the build did not produce it."""
    from creditline.native import otlp_spans
    return otlp_spans


def select_span_encoder(environ: Mapping[str, str],
                        load_compiled: Callable[[], SpanEncoder] = compiled_span_encoder,
                        ) -> SpanEncoder:
    """The compiled encoder or its twin, as select_compiled chooses (load_compiled: how,
    for a test of a build without it)."""
    return select_compiled(load_compiled, pure_span_encoder(), COMPILED_ENCODER, environ)


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how spans go, from the OTLP exporter variables."""

    endpoint: str
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = DEFAULT_TIMEOUT_S
    compression: str = "none"
    insecure: bool | None = None  # gRPC without a scheme: plaintext when true
    certificate_file: str = ""
    client_key_file: str = ""
    client_certificate_file: str = ""


def _variable(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    for variable in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = environ.get(variable, "").strip()
        if value:
            return variable, value
    return f"OTEL_EXPORTER_OTLP_{name}", ""


def _headers(variable: str, raw: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for pair in filter(None, (p.strip() for p in raw.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise TelemetryError(f"environment {variable}: {pair!r} is not key=value")
        headers.append((unquote(key.strip()).lower(), unquote(value.strip())))
    return tuple(headers)


def _endpoint(environ: Mapping[str, str], protocol: str) -> str:
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    generic = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if protocol == "grpc":
        return traces or generic or DEFAULT_GRPC_ENDPOINT
    if traces:
        return traces
    return (generic or DEFAULT_HTTP_ENDPOINT).rstrip("/") + HTTP_TRACES_PATH


def otlp_target(environ: Mapping[str, str], protocol: str) -> OtlpTarget:
    """The target the variables describe; TelemetryError naming a bad one."""
    variable, raw_timeout = _variable(environ, "TIMEOUT")
    try:
        timeout_s = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout_s = -1.0
    if not timeout_s > 0:
        raise TelemetryError(f"environment {variable}: {raw_timeout!r} is not seconds > 0")
    variable, compression = _variable(environ, "COMPRESSION")
    compression = compression.lower() or "none"
    allowed = ("gzip", "none") if protocol == "grpc" else ("gzip", "deflate", "none")
    if compression not in allowed:
        raise TelemetryError(f"environment {variable}: {compression!r} is not one of "
                             f"{', '.join(allowed)}")
    _, insecure = _variable(environ, "INSECURE")
    return OtlpTarget(
        endpoint=_endpoint(environ, protocol),
        headers=_headers(*_variable(environ, "HEADERS")), timeout_s=timeout_s,
        compression=compression,
        insecure=insecure.lower() in _TRUE if insecure else None,
        certificate_file=_variable(environ, "CERTIFICATE")[1],
        client_key_file=_variable(environ, "CLIENT_KEY")[1],
        client_certificate_file=_variable(environ, "CLIENT_CERTIFICATE")[1])


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as file:
        return file.read()


class SendError(Exception):
    """An export the receiver did not take; `retryable` if another try may succeed."""

    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.retryable = retryable


class _GrpcSend:
    def __init__(self, target: OtlpTarget) -> None:
        url = urlparse(target.endpoint if "://" in target.endpoint
                       else f"//{target.endpoint}")
        secure = url.scheme == "https" or (url.scheme != "http" and not target.insecure)
        address = url.netloc or target.endpoint
        compression = (grpc.Compression.Gzip if target.compression == "gzip"
                       else grpc.Compression.NoCompression)
        if secure:
            credentials = grpc.ssl_channel_credentials(
                _read(target.certificate_file), _read(target.client_key_file),
                _read(target.client_certificate_file))
            self._channel = grpc.secure_channel(address, credentials, compression=compression)
        else:
            self._channel = grpc.insecure_channel(address, compression=compression)
        # (no serializer: the request is already its wire bytes)
        self._export = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString)
        self._metadata = target.headers

    def __call__(self, body: bytes, timeout_s: float) -> None:
        try:
            response = self._export(body, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            raise SendError(f"{code.name}: {error}", code in RETRYABLE_CODES) from None
        _log_partial(response)

    def close(self) -> None:
        self._channel.close()


class _HttpSend:
    def __init__(self, target: OtlpTarget) -> None:
        import requests  # (only an HTTP exporter needs it)

        self._requests = requests
        self._session = requests.Session()
        self._session.headers.update({"Content-Type": "application/x-protobuf",
                                      **dict(target.headers)})
        if target.compression != "none":
            self._session.headers["Content-Encoding"] = target.compression
        self._target = target

    def _body(self, body: bytes) -> bytes:
        if self._target.compression == "gzip":
            return gzip.compress(body)
        if self._target.compression == "deflate":
            return zlib.compress(body)
        return body

    def __call__(self, body: bytes, timeout_s: float) -> None:
        target = self._target
        client_certificate = ((target.client_certificate_file, target.client_key_file)
                              if target.client_certificate_file else None)
        try:
            response = self._session.post(
                target.endpoint, data=self._body(body), timeout=timeout_s,
                verify=target.certificate_file or True, cert=client_certificate)
        except self._requests.RequestException as error:
            raise SendError(repr(error), retryable=True) from None
        if response.ok:
            if response.content:
                _log_partial(ExportTraceServiceResponse.FromString(response.content))
            return
        retryable = response.status_code in RETRYABLE_HTTP or response.status_code >= 500
        raise SendError(f"HTTP {response.status_code}: {response.text[:200]}", retryable)

    def close(self) -> None:
        self._session.close()


def _log_partial(response: ExportTraceServiceResponse) -> None:
    rejected = response.partial_success.rejected_spans
    if rejected:
        log.warning("the OTLP receiver rejected %d spans: %s", rejected,
                    response.partial_success.error_message)


class OtlpSpanExporter(SpanExporter):
    """Spans to an OTLP receiver over gRPC ("grpc") or HTTP ("http/protobuf")."""

    def __init__(self, protocol: str, target: OtlpTarget, encoder: SpanEncoder) -> None:
        self._send = _GrpcSend(target) if protocol == "grpc" else _HttpSend(target)
        self._encoder = encoder
        self._timeout_s = target.timeout_s
        self._endpoint = target.endpoint
        self._stopped = threading.Event()  # shutdown: a backoff's wait ends

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped.is_set():
            return SpanExportResult.FAILURE
        body = self._encoder.encode_spans(spans)
        deadline_s = time.monotonic() + self._timeout_s
        backoff_s = FIRST_BACKOFF_S
        while True:
            try:
                self._send(body, max(0.001, deadline_s - time.monotonic()))
                return SpanExportResult.SUCCESS
            except SendError as error:
                wait_s = backoff_s * random.uniform(0.8, 1.2)
                if not error.retryable or time.monotonic() + wait_s >= deadline_s:
                    log.warning("%d spans not exported to %s: %s", len(spans),
                                self._endpoint, error)
                    return SpanExportResult.FAILURE
            if self._stopped.wait(wait_s):
                return SpanExportResult.FAILURE
            backoff_s *= 2

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # (nothing is held here: the BatchSpanProcessor holds the spans)

    def shutdown(self) -> None:
        self._stopped.set()
        self._send.close()


def otlp_span_exporter(protocol: str, environ: Mapping[str, str] | None = None
                       ) -> OtlpSpanExporter:
    env = os.environ if environ is None else environ
    return OtlpSpanExporter(protocol, otlp_target(env, protocol), select_span_encoder(env))
