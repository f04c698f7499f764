"""The Charging service seen through Charging.Stream, with the unary stub's methods, so
every scenario test runs on both transports."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc


class StreamCharging:
    def __init__(self, stub: charging_pb2_grpc.ChargingStub) -> None:
        self._outgoing: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._waiting: dict[int, asyncio.Future[pb.StreamAnswer]] = {}
        self._ids = itertools.count(1)
        self._call = stub.Stream(self._requests())
        self._reader = asyncio.create_task(self._read())

    async def _requests(self) -> Any:
        while (request := await self._outgoing.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for answer in self._call:
            self._waiting.pop(answer.correlation_id).set_result(answer)

    async def _send(self, **request: Any) -> pb.StreamAnswer:
        correlation_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        await self._outgoing.put(pb.StreamRequest(correlation_id=correlation_id, **request))
        return await asyncio.wait_for(future, 30)

    async def Initial(self, request: pb.CreditControlRequest) -> pb.CreditControlAnswer:
        return (await self._send(initial=request)).credit_control

    async def Update(self, request: pb.CreditControlRequest) -> pb.CreditControlAnswer:
        return (await self._send(update=request)).credit_control

    async def Terminate(self, request: pb.CreditControlRequest) -> pb.CreditControlAnswer:
        return (await self._send(terminate=request)).credit_control

    async def Event(self, request: pb.EventRequest) -> pb.EventAnswer:
        answer = await self._send(event=request)
        # an event is answered in the event field, whatever happened to it
        assert answer.WhichOneof("answer") == "event", answer
        return answer.event

    async def close(self) -> None:
        await self._outgoing.put(None)
        await asyncio.wait_for(self._reader, 10)


@contextlib.asynccontextmanager
async def charging_over(channel: grpc.aio.Channel, transport: str) -> AsyncIterator[Any]:
    """The Charging service on `channel`: its unary RPCs ("unary"), or the same calls
    carried by one Charging.Stream ("stream")."""
    stub = charging_pb2_grpc.ChargingStub(channel)
    if transport == "unary":
        yield stub
        return
    stream = StreamCharging(stub)
    try:
        yield stream
    finally:
        await stream.close()
