"""Registers servicers with gRPC so that a request that is not valid protobuf gets
INVALID_ARGUMENT naming the message type, not gRPC's INTERNAL "Exception deserializing
request!". The deserializer never raises: it hands an `Unparsable` to the method wrapper,
which answers it; the call wrapper (interceptors.CallWrapper) still sees parsed messages
for every good request.

A servicer may answer with the message's wire bytes (the Charging service does: the rating
kernels write them): they are sent as they are. The call wrapper, when there is one, gets
each method's answer class to read such answers when a span or a metric needs them (a
sampled-out call then pays no parsing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Unparsable:
    message_type: str
    error: str


def _deserializer(message_class: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    def parse(raw: bytes) -> Message | Unparsable:
        try:
            return message_class.FromString(raw)
        except DecodeError as error:
            return Unparsable(message_class.DESCRIPTOR.full_name, str(error))
    return parse


def _passing_bytes(message_class: type[Message]) -> Callable[[Message | bytes], bytes]:
    """A response serializer that sends bytes as they are: a stream that writes the same
    event to many subscribers encodes it once (notifications.encoded_event)."""
    serialize = message_class.SerializeToString

    def encode(message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)
    return encode


async def _refuse(request: Unparsable, context: Context) -> Message:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid {request.message_type}: {request.error}")
    raise AssertionError("abort raises")


def _handler(method: MethodDescriptor, implementation: Any) -> grpc.RpcMethodHandler[Any, Any]:
    parse = _deserializer(GetMessageClass(method.input_type))
    serialize = _passing_bytes(GetMessageClass(method.output_type))

    # A good request is checked without a coroutine of its own (every call pays for one).
    async def one(request: Message | Unparsable, context: Context) -> Any:
        if isinstance(request, Unparsable):
            await _refuse(request, context)
        return await implementation(request, context)

    async def each(requests: AsyncIterator[Message | Unparsable], context: Context
                   ) -> AsyncIterator[Message]:
        async for request in requests:
            yield await _refuse(request, context) if isinstance(request, Unparsable) else request

    if method.client_streaming and method.server_streaming:
        async def both(requests: AsyncIterator[Message | Unparsable], context: Context
                       ) -> AsyncIterator[Message]:
            # an async generator itself: that is how grpc.aio recognises a streaming handler
            async for answer in implementation(each(requests, context), context):
                yield answer
        return grpc.stream_stream_rpc_method_handler(
            both, request_deserializer=parse, response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            one, request_deserializer=parse, response_serializer=serialize)
    if method.client_streaming:
        raise NotImplementedError(f"{method.full_name}: client streaming alone is not used")
    return grpc.unary_unary_rpc_method_handler(
        one, request_deserializer=parse,
        response_serializer=serialize)


# Quoted: the stubs make RpcMethodHandler generic, the runtime class is not subscriptable.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
# A call's metadata as grpc gives it: (key, value) pairs, a value bytes for a -bin key.
Metadata: TypeAlias = "Iterable[tuple[str, str | bytes]]"


@dataclass(frozen=True, slots=True)
class ByMetadata:
    """A method whose handler is chosen for each call from the call's metadata, the one
    grpc read to look the handler up (grpc.HandlerCallDetails.invocation_metadata): the
    call wrapper's, to find a caller's trace context. Why there, not from the servicer
    context: context.invocation_metadata() builds the metadata again on every call,
    3-7 us a call with one user-agent header, ~6k instructions, 1 % of a call's
    (`python bench/tracing_overhead.py --instructions`, 1 % runs, 2026-12-08)."""

    for_call: Callable[[Metadata], Handler]


# (the method's full name, its handler, its answer's message class: for answers written
# as wire bytes, read only when a span or a metric needs them) -> its handler, or its
# handler for each call
Wrap: TypeAlias = "Callable[[str, Handler, type[Message]], Handler | ByMetadata]"


if TYPE_CHECKING:  # generic in the stubs only, like RpcMethodHandler
    _ServiceHandler = grpc.ServiceRpcHandler[Any, Any]
else:
    _ServiceHandler = grpc.ServiceRpcHandler


class _Methods(_ServiceHandler):
    """The methods of one service by full name (grpc's own dictionary handler does the
    same)."""

    def __init__(self, name: str, handlers: Mapping[str, Handler | ByMetadata]) -> None:
        self._name = name
        self._handlers = {f"/{name}/{method}": handler for method, handler in handlers.items()
                          if not isinstance(handler, ByMetadata)}
        self._by_metadata = {f"/{name}/{method}": handler.for_call
                             for method, handler in handlers.items()
                             if isinstance(handler, ByMetadata)}

    def service_name(self) -> str:
        return self._name

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        for_call = self._by_metadata.get(method)
        if for_call is not None:
            return for_call(handler_call_details.invocation_metadata)
        return self._handlers.get(method)


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                wrap: Wrap | None = None) -> None:
    """Registers a servicer; `wrap` (the span, metrics and role check) gets each method's
    handler with its full name `/<service>/<method>` and returns the one to serve."""
    handlers = {m.name: _handler(m, getattr(servicer, m.name)) for m in service.methods}
    wrapped: Mapping[str, Handler | ByMetadata] = handlers if wrap is None else {
        m.name: wrap(f"/{service.full_name}/{m.name}", handlers[m.name],
                     GetMessageClass(m.output_type)) for m in service.methods}
    server.add_generic_rpc_handlers((_Methods(service.full_name, wrapped),))
