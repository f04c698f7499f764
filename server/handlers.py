"""Registers servicers with gRPC so that a request that is not valid protobuf gets
INVALID_ARGUMENT naming the message type, not gRPC's INTERNAL "Exception deserializing
request!". The methods take raw bytes; the parsing happens here, where it can be answered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

Context = grpc.aio.ServicerContext[Any, Any]


def _parser(message_class: type[Message]) -> Callable[[bytes, Context], Any]:
    async def parse(raw: bytes, context: Context) -> Message:
        try:
            return message_class.FromString(raw)
        except DecodeError as error:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid {message_class.DESCRIPTOR.full_name}: {error}")
            raise  # abort raises; this keeps the type checker informed
    return parse


def _handler(method: MethodDescriptor, implementation: Any) -> grpc.RpcMethodHandler[Any, Any]:
    parse = _parser(GetMessageClass(method.input_type))
    serialize = GetMessageClass(method.output_type).SerializeToString

    async def one(raw: bytes, context: Context) -> Any:
        return await implementation(await parse(raw, context), context)

    async def each(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Message]:
        async for raw in raws:
            yield await parse(raw, context)

    if method.client_streaming and method.server_streaming:
        async def both(raws: AsyncIterator[bytes], context: Context) -> AsyncIterator[Message]:
            # an async generator itself: that is how grpc.aio recognises a streaming handler
            async for answer in implementation(each(raws, context), context):
                yield answer
        return grpc.stream_stream_rpc_method_handler(both, response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(one, response_serializer=serialize)
    if method.client_streaming:
        raise NotImplementedError(f"{method.full_name}: client streaming alone is not used")
    return grpc.unary_unary_rpc_method_handler(one, response_serializer=serialize)


def add_service(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    handlers = {m.name: _handler(m, getattr(servicer, m.name)) for m in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
