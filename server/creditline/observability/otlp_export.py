"""The OTLP span exporters (HTTP and gRPC) with one more way in: `export_encoded`, which
sends an ExportTraceServiceRequest already written (otlp_encoding.CallEncoder) through the
exporter's own transport: its endpoint, headers, TLS, compression, timeout and retries,
all from the standard OTEL_EXPORTER_OTLP_* variables as usual.

Why: the exporters take only SDK spans and encode them with opentelemetry's generic
encoder, 65 us for a call's three spans against 16 us written directly (see
otlp_encoding). They offer no public way to send encoded bytes, so each subclass uses what
its exporter itself sends them with (opentelemetry-exporter-otlp 1.45): the HTTP client's
`export(bytes)`, the gRPC mixin's `_export` with `_translate_data`. A test sends through
both to real receivers. The exporters' own self-metrics (off unless
OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED) do not count these requests.

Imported only when an OTLP exporter is configured: each pulls in its transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult

log = logging.getLogger(__name__)


class EncodedHttpSpanExporter(HttpSpanExporter):
    def export_encoded(self, request: bytes, calls: int) -> SpanExportResult:
        """Sends a written ExportTraceServiceRequest of `calls` calls' spans."""
        if self._shutdown:
            log.warning("span exporter already shut down: %d calls' spans dropped", calls)
            return SpanExportResult.FAILURE
        limit = self._max_request_size
        if limit > 0 and len(request) > limit:
            log.warning("span batch of %d bytes is over the %d-byte request limit: %d "
                        "calls' spans dropped", len(request), limit, calls)
            return SpanExportResult.FAILURE
        result = self._client.export(request)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A written request, as the gRPC exporter's _export takes its data (its length is
    what the exporter counts)."""

    request: bytes
    calls: int

    def __len__(self) -> int:
        return self.calls


class EncodedGrpcSpanExporter(GrpcSpanExporter):
    def export_encoded(self, request: bytes, calls: int) -> SpanExportResult:
        """Sends a written ExportTraceServiceRequest of `calls` calls' spans."""
        return self._export(_Encoded(request, calls))  # type: ignore[arg-type]

    def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
        if isinstance(data, _Encoded):
            return ExportTraceServiceRequest.FromString(data.request)
        return super()._translate_data(data)
