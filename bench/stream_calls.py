"""Charging calls carried over one Charging.Stream: what a gateway that multiplexes many
sessions over one connection does. Each call is a StreamRequest with a correlation id of
its own; the answers come back in any order and are matched by that id.

The driver uses the same call signature for both transports, `call(request,
timeout=...)`, so the flows and the figures do not depend on the transport. A failure
raises CallFailedError with a gRPC status name, as an AioRpcError would carry:
DEADLINE_EXCEEDED when no answer came within the timeout (the stream goes on), or the
status that ended the stream for every call still waiting on it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc
from google.protobuf.message import Message

# The StreamRequest field of each method (the oneof `request`).
REQUEST_FIELDS = {"Initial": "initial", "Update": "update", "Terminate": "terminate",
                  "Event": "event"}
# How long closing waits for the server to end the stream after the last request.
CLOSE_TIMEOUT_S = 10.0


class CallFailedError(Exception):
    """A call on the stream got no answer; `code` is a gRPC status name."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class StreamCalls:
    """One Charging.Stream call and the calls in flight on it."""

    def __init__(self, stub: charging_pb2_grpc.ChargingStub) -> None:
        self._loop = asyncio.get_running_loop()
        # one writer: grpc consumes the request iterator in a task of its own
        self._outgoing: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[pb.StreamAnswer]] = {}
        self._ids = itertools.count(1)
        self._failed: str | None = None
        self._call = stub.Stream(self._requests())
        self._reader = self._loop.create_task(self._read())

    async def _requests(self) -> AsyncIterator[pb.StreamRequest]:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def _read(self) -> None:
        code = "CANCELLED"  # the stream ended with calls still waiting
        try:
            async for answer in self._call:
                future = self._waiting.pop(answer.correlation_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        except asyncio.CancelledError:
            pass
        self._fail_all(code)

    def _fail_all(self, code: str) -> None:
        self._failed = code
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(CallFailedError(code))

    def _expire(self, correlation_id: int) -> None:
        future = self._waiting.pop(correlation_id, None)
        if future is not None and not future.done():
            future.set_exception(CallFailedError("DEADLINE_EXCEEDED"))

    async def send(self, method: str, request: Message, timeout: float) -> Message:
        """The answer (CreditControlAnswer or EventAnswer) to one request."""
        if self._failed is not None:
            raise CallFailedError(self._failed)
        correlation_id = next(self._ids)
        future: asyncio.Future[pb.StreamAnswer] = self._loop.create_future()
        self._waiting[correlation_id] = future
        self._outgoing.put_nowait(pb.StreamRequest(
            correlation_id=correlation_id, **{REQUEST_FIELDS[method]: request}))
        # a timer per call, cancelled on the answer: cheaper than asyncio.wait_for
        deadline = self._loop.call_later(timeout, self._expire, correlation_id)
        try:
            answer = await future
        finally:
            deadline.cancel()
        return answer.event if method == "Event" else answer.credit_control

    def calls(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """The driver's call table: method -> call(request, timeout=...)."""
        def bind(method: str) -> Callable[..., Awaitable[Any]]:
            async def call(request: Message, timeout: float) -> Message:
                return await self.send(method, request, timeout)
            return call
        return {method: bind(method) for method in REQUEST_FIELDS}

    async def close(self) -> None:
        """Ends the requests; the server answers those in flight, then ends the stream."""
        self._outgoing.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._call.cancel()
            self._reader.cancel()
