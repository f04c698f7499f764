"""A real OTLP trace receiver for the tests, on an ephemeral port: the collector's
TraceService from opentelemetry-proto's generated gRPC code, or its HTTP form
(POST /v1/traces, protobuf, gzip or deflate) on the standard library's HTTP server. It
keeps what it received and the headers each export came with, and can be told to refuse
the next exports with a status."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

_DECOMPRESS = {"gzip": gzip.decompress, "deflate": zlib.decompress}
# the gRPC status a refusal by HTTP status stands for, on the gRPC receiver
GRPC_STATUS_OF_HTTP = {503: grpc.StatusCode.UNAVAILABLE, 400: grpc.StatusCode.INVALID_ARGUMENT}


@dataclass
class Receiver:
    endpoint: str = ""
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # each export's, lowercase
    refusals: list[int] = field(default_factory=list)  # HTTP statuses for the next exports
    attempts: int = 0

    def take(self, headers: dict[str, str]) -> int:
        """An export arrived: the status to answer it with (200: taken)."""
        self.attempts += 1
        self.headers.append(headers)
        return self.refusals.pop(0) if self.refusals else 200

    def spans(self) -> list[OtlpSpan]:
        return [span for request in self.requests for resource_spans in request.resource_spans
                for scope_spans in resource_spans.scope_spans for span in scope_spans.spans]


class _HttpHandler(BaseHTTPRequestHandler):
    receiver: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.receiver.take({k.lower(): v for k, v in self.headers.items()})
        encoding = self.headers.get("Content-Encoding")
        if status == 200 and self.path == "/v1/traces":
            body = _DECOMPRESS[encoding](body) if encoding else body
            self.receiver.requests.append(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(status if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


class _GrpcService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
               ) -> ExportTraceServiceResponse:
        status = self.receiver.take(dict(context.invocation_metadata()))  # type: ignore[arg-type]
        if status != 200:
            context.abort(GRPC_STATUS_OF_HTTP[status], "refused by the test")
        self.receiver.requests.append(request)
        return ExportTraceServiceResponse()


@contextmanager
def otlp_receiver(protocol: str) -> Iterator[Receiver]:
    """A receiver for "grpc" or "http/protobuf"; its endpoint is set when it listens."""
    receiver = Receiver()
    if protocol == "grpc":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_GrpcService(receiver),
                                                                  server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        receiver.endpoint = f"http://127.0.0.1:{port}"
        try:
            yield receiver
        finally:
            server.stop(grace=None)
        return
    handler = type("Handler", (_HttpHandler,), {"receiver": receiver})
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    receiver.endpoint = f"http://127.0.0.1:{http_server.server_port}"
    try:
        yield receiver
    finally:
        http_server.shutdown()
        http_server.server_close()
