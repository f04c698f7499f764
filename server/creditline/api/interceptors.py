"""One wrapper for what every call shares: the role check, the span and the metrics.
The servicers know nothing of them.

Each method handler of the Charging, Admin and Notifications services is wrapped once,
when the service is registered (handlers.add_service, through grpc's public
GenericRpcHandler and method-handler API), and only when something is switched on (mutual
TLS, a tracer or metrics): a server without them has no wrapper and pays nothing per call.
Why not a grpc.aio ServerInterceptor: grpc.aio runs an interceptor's chain of coroutines
(and our lookup of the wrapped handler) for every call before it even finds the handler;
with nothing switched on but the interceptor, the quietest end-to-end run measured +40-53 us
of server CPU per call, the wrapper alone measures nothing.

Spans are the SDK's (telemetry.Telemetry.tracer), by the rpc.* semantic conventions:
- a unary call: a SERVER span `<service>/<method>`, child of the caller's trace when its
  metadata carries W3C `traceparent` / `tracestate` (read from the metadata grpc gives the
  method's handler lookup, handlers.ByMetadata: such a call gets a handler of its own,
  bound to its caller's trace context; a call without them is served by the method's
  shared one);
- Charging.Stream: a span for the stream, and one per request it carries (named by the
  request's kind, `creditline.v1.Charging/Update`, ...), each the root of a trace of its
  own (sampled on its own: a stream lives for hours) with a Link to the stream's span;
- Subscribe, SubscribeBatches: one span per subscription (events are counted, not spanned);
- a Diameter CCR: a span for the charging request it makes, named by its kind
  (`creditline.v1.Charging/Update`, ...), the root of its trace; metrics as a unary call's
  with creditline.transport=diameter (the Diameter peer's own messages, CER, DWR, ..., are
  not counted here).
Attributes: rpc.system, rpc.service, rpc.method, rpc.grpc.status_code, and
creditline.account_id, creditline.session_id, creditline.request_number,
creditline.rating_groups and creditline.result_code read from the request and answer;
creditline.redis.calls and creditline.redis.duration_s, the count and time of the call's
Redis script calls (observability/telemetry.py's ScriptInstrument).
Status ERROR only for server errors (the OTel convention for servers): a NOT_FOUND is the
caller's. A child (rating) is a span only under a sampled parent. A call with no caller's
trace context is first drawn by the root sampling (telemetry.RootSampling), and with a
parent-based sampler a caller's unsampled trace is left out there too: a call left out
makes no span at all, and a unary one (drawn when its handler is looked up) is served
unwrapped when nothing else (metrics, the role check) needs the wrapper.
A call refused by the role check is traced and counted with its status, and never reaches
the servicer. Health is registered without the wrapper; reflection through it for the role
check only.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import Token
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import grpc
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from creditline.api import security
from creditline.api.handlers import ByMetadata, Metadata
from creditline.observability.telemetry import (
    CallRecord,
    Metrics,
    RootSampling,
    reset_call_record,
    set_call_record,
)
from creditline.v1 import charging_pb2 as pb

# Quoted: the stubs make RpcMethodHandler generic, the runtime class is not subscriptable.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
ServicerContext = grpc.aio.ServicerContext[Any, Any]
# How a Stream's request is answered: its StreamAnswer's wire bytes.
StreamAnswerer: TypeAlias = "Callable[[pb.StreamRequest], Awaitable[bytes]]"
# How a Diameter CCR's charging request is observed: (its method, the request, what answers
# it (the answer's wire bytes), the answer's class) -> the answer's wire bytes.
DiameterObserver: TypeAlias = ("Callable[[str, Message, Callable[[], Awaitable[bytes]], "
                               "type[Message]], Awaitable[bytes]]")
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_PROPAGATOR = TraceContextTextMapPropagator()
# The parent of a call that brought no trace context, and of a Stream's request: none.
_NO_PARENT = TraceContext()
# The context of a root call left out by the root sampling: no span is current in it.
_NO_SPAN = trace.set_span_in_context(INVALID_SPAN, _NO_PARENT)
_UNIT_FIELDS = ("time_s", "total_octets", "service_specific_units")
# rpc.grpc.status_code: the number of each status (StatusCode.value is a tuple)
_STATUS_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
# The statuses that are the server's fault: its span's status is ERROR (OTel's rpc
# conventions for servers); the others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED})
_CHARGING = "creditline.v1.Charging"
# The services whose streaming calls are traced and counted (reflection is not).
_OBSERVED_STREAMS = frozenset({_CHARGING, "creditline.v1.Notifications"})
# A StreamRequest's oneof field -> the method it stands for
_STREAM_METHODS = {"initial": "Initial", "update": "Update", "terminate": "Terminate",
                   "event": "Event", None: "Stream"}
# The charging methods a Diameter CCR stands for (CC-Request-Type INITIAL, UPDATE,
# TERMINATION, EVENT), counted and spanned under these names with
# creditline.transport=diameter
DIAMETER_METHODS = ("Initial", "Update", "Terminate", "Event")
MAX_SPAN_RATING_GROUPS = 64
_ID_ATTRIBUTES = (("account_id", "creditline.account_id"),
                  ("session_id", "creditline.session_id"))


@dataclass(frozen=True, slots=True)
class _Method:
    """What every call of one method shares, made once: its span's name and attributes,
    its metrics' attributes."""

    span_name: str
    attributes: Mapping[str, Any]  # rpc.system, rpc.service, rpc.method
    labels: Mapping[str, Any]  # and creditline.transport

    @classmethod
    def of(cls, service: str, name: str, transport: str) -> _Method:
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        return cls(f"{service}/{name}", attributes,
                   {**attributes, "creditline.transport": transport})


def _split_method(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def caller_context(metadata: Metadata | None) -> TraceContext:
    """The caller's trace context from its W3C trace headers in a call's metadata; none
    (_NO_PARENT) when it sent none."""
    headers: dict[str, str] | None = None
    for key, value in metadata or ():
        if key in _TRACE_HEADERS and isinstance(value, str):
            headers = headers or {}
            headers[key] = value
    return _NO_PARENT if headers is None else _PROPAGATOR.extract(headers, _NO_PARENT)


def _left_out(roots: RootSampling, parent: TraceContext) -> bool:
    """Whether a call makes no span at all: a root (no caller's trace context, or one
    naming no valid span: a malformed traceparent) the root sampling leaves out, or a
    caller's unsampled trace when the SDK's sampler would drop its span anyway
    (RootSampling.parent_based: why)."""
    caller = None if parent is _NO_PARENT else trace.get_current_span(parent).get_span_context()
    if caller is None or not caller.is_valid:
        return not roots.traced()
    return roots.parent_based and not caller.trace_flags.sampled


def _status_code(context: ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED  # the caller went away
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.UNKNOWN


class UnaryCall(Protocol):
    """A unary method's wrapped call: grpc calls it with (request, context); a call that
    brings a caller's trace context, also with that (CallWrapper._for_call)."""

    def __call__(self, request: Any, context: ServicerContext,
                 parent: TraceContext | None = ...) -> Awaitable[Any]: ...


# What a call's context was made: the OTel context and the call record made current.
Attached: TypeAlias = "tuple[Token[TraceContext], Token[CallRecord | None]]"
# A call's span (None without a tracer); when a context was made current for it, the
# tokens that undo that; when it is recorded, its CallRecord.
Started: TypeAlias = "tuple[Span | None, Attached | None, CallRecord | None]"


def _attach(context: TraceContext, record: CallRecord | None) -> Attached:
    return otel_context.attach(context), set_call_record(record)


def _detach(attached: Attached) -> None:
    context_token, record_token = attached
    reset_call_record(record_token)
    otel_context.detach(context_token)


class Observer:
    """Starts and ends the spans and records the metrics of calls and Stream requests."""

    def __init__(self, tracer: Tracer | None, metrics: Metrics | None,
                 roots: RootSampling | None = None) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self.roots = roots or RootSampling()

    def start(self, method: _Method, parent: TraceContext | None, request: Any = None,
              links: list[Link] | None = None, *, current_anyway: bool = False,
              drawn: bool = False) -> Started:
        """The span (None without a tracer) and, when it is recorded, its CallRecord
        holding its method's and request's attributes (set when it ends). The span is made
        the current one, with its record, when it is recorded (for its children, its
        Redis calls and the log records) or `current_anyway` (a Stream's request: its
        children must not take the stream's span for their parent); end() undoes that.
        drawn: already drawn by the root sampling, and left out when parent is None."""
        if self.metrics is not None:
            self.metrics.in_flight.add(1, method.labels)
        if self.tracer is None:
            return None, None, None
        if parent is None or (not drawn and _left_out(self.roots, parent)):
            # a call left out (RootSampling): no span at all; a Stream's request still
            # hides the stream's span (and record) from its children
            return None, _attach(_NO_SPAN, None) if current_anyway else None, None
        # (no attributes at the start: all are set at the end, in one mapping, CallRecord
        # says why; the samplers here do not read them)
        span = self.tracer.start_span(method.span_name, parent, SpanKind.SERVER, None,
                                      links)
        if not span.is_recording():
            return span, _attach(trace.set_span_in_context(span, parent), None) \
                if current_anyway else None, None
        record = CallRecord(span, {**method.attributes, **request_attributes(request)}
                            if request is not None else {**method.attributes})
        return span, _attach(trace.set_span_in_context(span, parent), record), record

    def reads(self, started: Started) -> bool:
        """Whether the call's answer is read: for metrics, or a recorded span."""
        return self.metrics is not None or started[2] is not None

    def end(self, method: _Method, started: Started, response: Any,
            status: grpc.StatusCode, error: BaseException | None) -> None:
        _, attached, record = started
        if attached is not None:
            _detach(attached)
        if record is not None:
            _end_span(record, response, status, error)
        if self.metrics is not None:
            self.metrics.in_flight.add(-1, method.labels)


def _end_span(record: CallRecord, response: Any, status: grpc.StatusCode,
              error: BaseException | None) -> None:
    """The span's attributes, in one mapping (its method's and request's, gathered at
    its start, its answer's, its Redis calls'); its status; its error."""
    span = record.span
    span.set_attributes(record.end_attributes(answer_attributes(response, status)))
    if status in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, status.name))
    if error is not None and not isinstance(error, grpc.aio.AbortError) \
            and status is not grpc.StatusCode.CANCELLED:
        span.record_exception(error)
    span.end()


def request_attributes(request: Any) -> dict[str, Any]:
    """A call's span attributes from its request: its ids, request number and rating
    groups (those it has)."""
    attributes: dict[str, Any] = {}
    for field_name, attribute in _ID_ATTRIBUTES:
        value = getattr(request, field_name, None)
        if value:
            attributes[attribute] = value
    request_number = getattr(request, "request_number", None)
    if request_number is not None:
        attributes["creditline.request_number"] = request_number
    blocks = getattr(request, "rating_groups", None)
    if blocks:
        attributes["creditline.rating_groups"] = [
            block.rating_group for block in blocks[:MAX_SPAN_RATING_GROUPS]]
    return attributes


def answer_attributes(response: Any, status: grpc.StatusCode) -> dict[str, Any]:
    """A call's span attributes from its end: its gRPC status and its answer's result
    code."""
    attributes: dict[str, Any] = {"rpc.grpc.status_code": _STATUS_NUMBERS[status]}
    result_code = getattr(response, "result_code", None)
    if result_code is not None:
        attributes["creditline.result_code"] = int(result_code)
    return attributes


class CallWrapper:
    def __init__(self, *, tracer: Tracer | None, metrics: Metrics | None,
                 check_roles: bool, roots: RootSampling | None = None) -> None:
        self._observer = Observer(tracer, metrics, roots)
        self._observed = tracer is not None or metrics is not None
        self._check_roles = check_roles
        # only a span to make: a unary call left out by the root sampling needs no wrapper
        self._only_traced = tracer is not None and metrics is None and not check_roles
        self._stream_methods = {which: _Method.of(_CHARGING, name, "stream")
                                for which, name in _STREAM_METHODS.items()}
        self._diameter_methods = {name: _Method.of(_CHARGING, name, "diameter")
                                  for name in DIAMETER_METHODS}
        for described in (*self._stream_methods.values(), *self._diameter_methods.values()):
            self._count_from_zero(described)

    def _count_from_zero(self, described: _Method) -> None:
        """The 5012 counter's series of a charging method, at 0 from the start: a rate
        over it (an alert) then sees the first 5012, not only the second."""
        metrics = self._observer.metrics
        if metrics is not None and described.labels["rpc.service"] == _CHARGING:
            metrics.unable_to_comply.add(0, described.labels)

    def wrap(self, method: str, handler: Handler, answer_class: type[Message]
             ) -> Handler | ByMetadata:
        """The handler of `method` (`/<service>/<method>`) with the span, metrics and
        role check around it; answer_class reads answers sent as wire bytes. A unary
        method, traced: its handler for each call (ByMetadata), one of its own for a
        call that brings a caller's trace context."""
        service, _ = _split_method(method)
        is_open = service in security.OPEN_SERVICES
        if handler.unary_unary is not None and not is_open:
            call = self._unary(method, handler.unary_unary, answer_class)
            unary = self._unary_handler(handler, call)
            if self._observer.tracer is None:
                return unary
            return ByMetadata(self._for_call(handler, call, unary,
                                             self._left_out_handler(handler, call)))
        observed = self._observed and service in _OBSERVED_STREAMS
        if is_open or not (self._check_roles or observed):
            return handler
        return self._streaming(method, handler, observed)

    @staticmethod
    def _unary_handler(handler: Handler,
                       call: Callable[[Any, ServicerContext], Awaitable[Any]]) -> Handler:
        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _left_out_handler(self, handler: Handler, call: UnaryCall) -> Handler:
        """A unary method's handler for the calls the root sampling leaves out: with only a
        span to make, the method's own, unwrapped; else the wrapper without a span (its
        metrics, its role check). Why unwrapped: the wrapper's coroutine is resumed at
        each of the call's awaits; a left-out call cost +10.7k instructions through it,
        +4.8k unwrapped (`python bench/tracing_overhead.py --instructions`, its 1 % runs,
        2026-12-08)."""
        if self._only_traced:
            return handler

        async def left_out(request: Any, context: ServicerContext) -> Any:
            return await call(request, context, None)
        return self._unary_handler(handler, left_out)

    def _for_call(self, handler: Handler, call: UnaryCall, unary: Handler,
                  left_out: Handler) -> Callable[[Metadata], Handler]:
        """What chooses one call's handler, the root sampling drawn for it: left_out's when
        it leaves the call out; the method's shared one (unary) when the call brings no
        caller's trace context; else one of its own, bound to that context (_for_caller).
        One function, the scan and the draw inline, for the call that brings no trace
        headers (nearly every one). Through a partial and four functions (_for_call,
        caller_context, _left_out, RootSampling.traced), with ScriptInstrument.run, a
        left-out call cost +6.0k instructions over tracing off; inline, +1.5-2.6k (two
        runs of `python bench/tracing_overhead.py --instructions`, its 0 % mode,
        2026-12-08)."""
        roots = self._observer.roots
        draw, ratio = roots.draws.random, roots.ratio  # (random() < 1.0: ratio 1 always)

        def for_call(metadata: Metadata) -> Handler:
            for key, _ in metadata or ():
                if key in _TRACE_HEADERS:
                    return self._for_caller(handler, call, unary, left_out, metadata)
            return unary if draw() < ratio else left_out
        return for_call

    def _for_caller(self, handler: Handler, call: UnaryCall, unary: Handler,
                    left_out: Handler, metadata: Metadata) -> Handler:
        """The handler of a call that sent trace headers."""
        parent = caller_context(metadata)
        if _left_out(self._observer.roots, parent):
            return left_out
        if parent is _NO_PARENT:
            return unary

        async def child(request: Any, context: ServicerContext) -> Any:
            return await call(request, context, parent)
        return self._unary_handler(handler, child)

    @property
    def stream_request(self) -> Callable[[pb.StreamRequest, StreamAnswerer],
                                         Awaitable[bytes]] | None:
        """What answers each request of Charging.Stream (ChargingService's hook): its
        span and metrics around the answering; None when nothing observes them."""
        return self._stream_request if self._observed else None

    async def _authorize(self, service: str, context: ServicerContext
                         ) -> security.Principal:
        try:
            return security.authorize(service, context.auth_context())
        except security.CallRefusedError as refused:
            await context.abort(refused.code, refused.reason)
            raise

    def _unary(self, method: str, inner: Callable[..., Any], answer_class: type[Message]
               ) -> UnaryCall:
        service, name = _split_method(method)
        observer, check_roles = self._observer, self._check_roles
        described = _Method.of(service, name, "unary")
        self._count_from_zero(described)

        async def call(request: Any, context: ServicerContext,
                       parent: TraceContext | None = _NO_PARENT) -> Any:
            # parent: None for a call the root sampling left out (drawn by _for_call)
            if not self._observed:
                await self._authorize(service, context)
                return await inner(request, context)
            started = observer.start(described, parent, request, drawn=True)
            start_s = time.perf_counter()
            error: BaseException | None = None
            response: Any = None
            try:
                # a refused call is traced and counted too, but never reaches the servicer
                if check_roles:
                    await self._authorize(service, context)
                response = await inner(request, context)
                return response
            except BaseException as raised:
                error = raised
                raise
            finally:
                status = _status_code(context, error)
                answer = _message(response, answer_class) if observer.reads(started) \
                    else None
                observer.end(described, started, answer, status, error)
                if observer.metrics is not None:
                    _record(observer.metrics, described, status, request, answer,
                            time.perf_counter() - start_s)

        return call

    async def _stream_request(self, request: pb.StreamRequest, answer: StreamAnswerer
                              ) -> bytes:
        """One request of a Stream: a span of its own linked to the stream's, and the
        metrics of a unary call of its kind (creditline.transport=stream)."""
        which = request.WhichOneof("request")
        inner = None if which is None else getattr(request, which)
        stream = trace.get_current_span().get_span_context()  # (the Stream's own span)
        links = [Link(stream)] if stream.is_valid and stream.trace_flags.sampled else None
        metrics = self._observer.metrics
        if metrics is not None:
            metrics.stream_in_flight.add(1)
        try:
            return await self._observe(self._stream_methods[which], inner,
                                       lambda: answer(request), _stream_reply, links)
        finally:
            if metrics is not None:
                metrics.stream_in_flight.add(-1)

    @property
    def diameter_request(self) -> DiameterObserver | None:
        """What observes each charging request a Diameter CCR makes (GyApplication's hook):
        None when nothing observes them."""
        return self._diameter_request if self._observed else None

    async def _diameter_request(self, method: str, request: Message,
                                answer: Callable[[], Awaitable[bytes]],
                                answer_class: type[Message]) -> bytes:
        """A CCR's charging request (method Initial, Update, Terminate or Event): a span,
        the root of its trace, and the metrics of a unary call of its kind
        (creditline.transport=diameter)."""
        return await self._observe(self._diameter_methods[method], request, answer,
                                   answer_class.FromString, None)

    async def _observe(self, described: _Method, request: Any,
                       answer: Callable[[], Awaitable[bytes]],
                       read_answer: Callable[[bytes], Any], links: list[Link] | None
                       ) -> bytes:
        """A charging request that did not come as a unary gRPC call: its span (current
        for its children, never the stream's or a previous request's) and metrics."""
        observer = self._observer
        started = observer.start(described, _NO_PARENT, request, links,
                                 current_anyway=True)
        start_s = time.perf_counter()
        raw: bytes | None = None
        error: BaseException | None = None
        try:
            raw = await answer()
            return raw
        except BaseException as raised:
            error = raised
            raise
        finally:
            reply = None if raw is None or not observer.reads(started) else read_answer(raw)
            status = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            observer.end(described, started, reply, status, error)
            if observer.metrics is not None:
                _record(observer.metrics, described, status, request, reply,
                        time.perf_counter() - start_s)

    def _streaming(self, method: str, handler: Handler, observed: bool) -> Handler:
        """Streams: the role check, the caller kept as current_principal() for the
        handler's own per-account filter, and (observed) one span for the whole call."""
        service, name = _split_method(method)
        inner: Callable[..., Any] = (handler.unary_stream or handler.stream_unary
                                     or handler.stream_stream)  # type: ignore[assignment]
        described = _Method.of(service, name, "stream")
        observer = self._observer if observed else None

        async def call(request: Any, context: ServicerContext) -> Any:
            started = None if observer is None else observer.start(
                described, caller_context(context.invocation_metadata())
                if observer.tracer else _NO_PARENT)
            error: BaseException | None = None
            try:
                return await self._stream(service, inner, request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                if observer is not None and started is not None:
                    status = _status_code(context, error)
                    observer.end(described, started, None, status, error)
                    if observer.metrics is not None:
                        observer.metrics.requests.add(1, {
                            **described.labels, "rpc.grpc.status_code": _STATUS_NUMBERS[status],
                            "creditline.result_code": 0})

        kinds: Mapping[bool, Callable[..., Handler]] = {
            True: grpc.stream_stream_rpc_method_handler if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler,
            False: grpc.stream_unary_rpc_method_handler,
        }
        return kinds[handler.response_streaming](
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    async def _stream(self, service: str, inner: Callable[..., Any], request: Any,
                      context: ServicerContext) -> Any:
        token = None
        if self._check_roles:
            token = security.set_current_principal(await self._authorize(service, context))
        try:
            result = inner(request, context)
            if inspect.isasyncgen(result):
                await _write_all(result, context)
                return None
            return await result
        finally:
            if token is not None:
                security.reset_current_principal(token)


async def _write_all(messages: AsyncIterator[Any], context: ServicerContext) -> None:
    async for message in messages:
        await context.write(message)


def _message(answer: Any, answer_class: type[Message]) -> Any:
    """The answer as a message (the Charging service answers with its wire bytes)."""
    return answer_class.FromString(answer) if isinstance(answer, bytes) else answer


def _stream_reply(raw: bytes) -> Any:
    """The answer inside a StreamAnswer's wire bytes (a CreditControlAnswer or an
    EventAnswer)."""
    answer = pb.StreamAnswer.FromString(raw)
    which = answer.WhichOneof("answer")
    return None if which is None else getattr(answer, which)


def _record(metrics: Metrics, method: _Method, status: grpc.StatusCode,
            request: Any, response: Any, duration_s: float) -> None:
    attributes = {**method.labels, "rpc.grpc.status_code": _STATUS_NUMBERS[status]}
    metrics.duration.record(duration_s, attributes)
    result_code = int(getattr(response, "result_code", 0) or 0)
    metrics.requests.add(1, {**attributes, "creditline.result_code": result_code})
    if result_code == pb.UNABLE_TO_COMPLY:
        metrics.unable_to_comply.add(1, method.labels)
    blocks = getattr(response, "rating_groups", None)
    if blocks:
        _record_money(metrics, method, request, blocks)


def _record_money(metrics: Metrics, method: _Method, request: Any, blocks: Any) -> None:
    """Granted units and money charged of an answer's rating-group blocks."""
    direct_debit = getattr(request, "action", None) == pb.DIRECT_DEBIT
    for block in blocks:
        rating_group = {"creditline.rating_group": block.rating_group}
        granted = getattr(block, "granted", None)
        if granted is not None:
            for unit in _UNIT_FIELDS:
                if granted.HasField(unit) and getattr(granted, unit):
                    metrics.granted_units.add(getattr(granted, unit),
                                              {**rating_group, "creditline.unit": unit})
        charged = block.amount_micros if direct_debit else (
            getattr(block, "charged_micros", 0) or 0)
        if charged > 0:
            metrics.charged_micros.add(
                charged, {**rating_group, "rpc.method": method.labels["rpc.method"]})
