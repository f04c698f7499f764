"""The Notifications service: Subscribe and SubscribeBatches over the event hub
(creditline.events.hub), with events encoded once for all their subscribers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from creditline.api.security import Role, current_principal
from creditline.events.hub import (
    MAX_BATCH_EVENTS,
    RESUME_CURSOR_METADATA,
    STANDARD_FIELDS,
    START_CURSOR_METADATA,
    EventHub,
    Position,
    StreamEvent,
    Subscription,
    decode_cursor,
    encode_cursor,
    set_done,
)
from creditline.observability.telemetry import Metrics
from creditline.settings import MAX_BATCH_LINGER_S
from creditline.store.store import account_partition
from creditline.v1 import notifications_pb2 as pb
from creditline.v1 import notifications_pb2_grpc


async def _authorize(accounts: frozenset[str] | None,
                     context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """With mutual TLS, a subscriber reads its own accounts only; admins read all."""
    principal = current_principal()
    if accounts is None:
        if Role.ADMIN not in principal.roles:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{principal.name}: account_ids: name your own accounts")
        return
    for account_id in sorted(accounts):
        if not principal.may_read_account(account_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{principal.name}: may not read account {account_id}")


# Subscribers get bytes encoded once per event (the handlers pass bytes through) instead
# of a copy of a shared message per subscriber, encoded by gRPC: per event in a batch
# ~1 us less, per Subscribe message ~0.4 us (timeit). Protobuf parses fields in any order,
# and a length-delimited field is its tag, its length as a varint and its bytes, so a
# message with its cursor is the shared encoding followed by the encoded cursor field.
def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint: 7 bits a byte, the lowest first, the top bit set on
    every byte but the last."""
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _length_delimited_tag(message: type[pb.ChargeEvent] | type[pb.ChargeEventBatch],
                          name: str) -> bytes:
    """The tag of a string or message field: its number and wire type 2."""
    return _varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | 2)


_EVENT_CURSOR_TAG = _length_delimited_tag(pb.ChargeEvent, "cursor")
_BATCH_EVENT_TAG = _length_delimited_tag(pb.ChargeEventBatch, "events")
_BATCH_CURSOR_TAG = _length_delimited_tag(pb.ChargeEventBatch, "cursor")


def _string_field(tag: bytes, value: str) -> bytes:
    data = value.encode()
    return tag + _varint(len(data)) + data


def encoded_event(event: StreamEvent) -> bytes:
    """The event's ChargeEvent without a cursor, encoded once for every subscriber."""
    if event.encoded is None:
        event.encoded = _message_of(event).SerializeToString()
    return event.encoded


def encoded_event_in_batch(event: StreamEvent) -> bytes:
    """The event as one entry of ChargeEventBatch.events, encoded once."""
    if event.encoded_in_batch is None:
        encoded = encoded_event(event)
        event.encoded_in_batch = _BATCH_EVENT_TAG + _varint(len(encoded)) + encoded
    return event.encoded_in_batch


def event_message_bytes(event: StreamEvent, cursor: str) -> bytes:
    """An encoded ChargeEvent: the event with a subscriber's cursor."""
    return encoded_event(event) + _string_field(_EVENT_CURSOR_TAG, cursor)


def batch_message_bytes(encoded_events: Iterable[bytes], cursor: str) -> bytes:
    """An encoded ChargeEventBatch of events from encoded_event_in_batch."""
    return b"".join(encoded_events) + _string_field(_BATCH_CURSOR_TAG, cursor)


def _message_of(event: StreamEvent) -> pb.ChargeEvent:
    f = event.fields
    message = pb.ChargeEvent(
        event_id=f"{event.partition}-{event.position.stream_id}-{event.index}",
        type=pb.EventType.Value(f["t"].upper()), account_id=f.get("a", ""),
        session_id=f.get("s", ""), rating_group=f.get("rg", ""),
        units=int(f.get("units", 0)), amount_micros=int(f.get("amount", 0)),
        balance_micros=int(f.get("balance", 0)), time_unix_ms=int(f.get("ts", 0)),
    )
    for key, value in f.items():
        if key not in STANDARD_FIELDS:
            message.details[key] = value
    return message


async def _linger(subscription: Subscription, linger_s: float) -> None:
    """Waits `linger_s` for more events to join a batch, less once the queue holds a full
    batch. Why: each gRPC write costs the server a send system call and the completion's
    wake-ups whatever it carries (py-spy --native of notify_bench: sendmsg ~40 % of the
    event loop's samples with 100 subscribers); the event's own work is a few us."""
    if subscription.queue.qsize() + 1 >= subscription.full_batch:
        return
    loop = asyncio.get_running_loop()
    batch_full = subscription.batch_full = loop.create_future()
    timer = loop.call_later(linger_s, set_done, batch_full)
    try:
        await batch_full
    finally:
        timer.cancel()
        subscription.batch_full = None


# Subscribe writes encoded ChargeEvent messages, SubscribeBatches ChargeEventBatch ones.
_Context = grpc.aio.ServicerContext[pb.SubscribeRequest, bytes]
# How a subscription's events are written: one message each, or in batches.
_Sender = Callable[[Subscription, Iterable[StreamEvent], _Context], Awaitable[None]]


# creditline.events.delivered's attributes, by method (made once)
_DELIVERED_LABELS = {method: {"rpc.method": method} for method in ("Subscribe",
                                                                     "SubscribeBatches")}


class NotificationsService(notifications_pb2_grpc.NotificationsServicer):
    def __init__(self, hub: EventHub, queue_size: int, max_subscribers: int,
                 metrics: Metrics | None = None, batch_linger_s: float = 0.0) -> None:
        # batch_linger_s: checked with the other settings (subscriber_batch_linger_s)
        self._hub = hub
        self._queue_size = queue_size
        # how long a SubscribeBatches message waits for more events after the first one
        self._batch_linger_s = batch_linger_s
        self._max_subscribers = max_subscribers
        self._metrics = metrics  # None: telemetry off

    # Not an async generator: events are written with context.write() from a task, so
    # that a subscriber stalled in a write can still be ended with its cursor.
    async def Subscribe(  # type: ignore[override]
            self, request: pb.SubscribeRequest, context: _Context) -> None:
        if request.HasField("batch_linger_ms"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "batch_linger_ms: only for SubscribeBatches (Subscribe "
                                "writes one message per event)")
        await self._serve(request, context, self._send, linger_s=0.0)

    async def SubscribeBatches(  # type: ignore[override]
            self, request: pb.SubscribeRequest, context: _Context) -> None:
        linger_s = self._batch_linger_s
        if request.HasField("batch_linger_ms"):
            if request.batch_linger_ms > MAX_BATCH_LINGER_S * 1000:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"batch_linger_ms: at most {MAX_BATCH_LINGER_S * 1000:.0f}")
            linger_s = request.batch_linger_ms / 1000
        await self._serve(request, context, self._send_batch, linger_s)

    async def _serve(self, request: pb.SubscribeRequest, context: _Context,
                     send: _Sender, linger_s: float) -> None:
        if len(self._hub.subscriptions) >= self._max_subscribers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"at most {self._max_subscribers} subscribers per process")
        subscription = await self._subscription(request, context)
        cursor = await self._cursor(request, subscription, context)
        # Joining gives the positions after which every event reaches the queue; the
        # events before them are read from the streams by _deliver.
        joined = await self._hub.join(subscription)
        self._count_subscribers(+1)
        try:
            start = joined if cursor is None else await self._checked_cursor(
                cursor, subscription, joined, context)
            subscription.positions = dict(start)
            await context.send_initial_metadata(
                ((START_CURSOR_METADATA, encode_cursor(start)),))
            writer = asyncio.create_task(
                self._deliver(subscription, joined, context, send, linger_s))
            overflow = asyncio.create_task(subscription.overflowed.wait())
            try:
                await asyncio.wait({writer, overflow}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                writer.cancel()
                overflow.cancel()
        finally:
            self._hub.leave(subscription)
            self._count_subscribers(-1)
        if subscription.overflowed.is_set():
            cursor_now = encode_cursor(subscription.positions)
            context.set_trailing_metadata(((RESUME_CURSOR_METADATA, cursor_now),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"subscriber fell behind; resume from cursor {cursor_now}")
        writer.result()  # re-raises what ended the delivery

    def _count_subscribers(self, change: int) -> None:
        if self._metrics is not None:
            self._metrics.notification_subscribers.add(change)

    def _count_delivered(self, events: int, method: str) -> None:
        if self._metrics is not None:
            self._metrics.events_delivered.add(events, _DELIVERED_LABELS[method])

    async def _subscription(self, request: pb.SubscribeRequest,
                            context: _Context
                            ) -> Subscription:
        names = set()
        for value in request.event_types:
            if value not in pb.EventType.values() or value == pb.EVENT_TYPE_UNSPECIFIED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"event_types: unknown value {value}")
            names.add(pb.EventType.Name(value).lower())
        accounts = frozenset(request.account_ids) or None
        await _authorize(accounts, context)
        partitions = frozenset(
            range(self._hub.partitions) if accounts is None
            else (account_partition(a, self._hub.partitions) for a in accounts))
        return Subscription(partitions=partitions, account_ids=accounts,
                            event_types=frozenset(names) or None,
                            queue=asyncio.Queue(self._queue_size))

    async def _cursor(
        self, request: pb.SubscribeRequest, subscription: Subscription,
        context: _Context,
    ) -> dict[int, Position] | None:
        """The resume cursor's positions for the subscription's partitions, or None."""
        if not request.cursor:
            return None
        try:
            cursor = decode_cursor(request.cursor)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        missing = subscription.partitions - cursor.keys()
        if missing:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"cursor: does not cover partition {min(missing)}; resume "
                                "with the account filter the cursor came from")
        return {p: cursor[p] for p in subscription.partitions}

    async def _checked_cursor(
        self, cursor: dict[int, Position], subscription: Subscription,
        joined: Mapping[int, Position],
        context: _Context,
    ) -> dict[int, Position]:
        """The cursor, refused when events after it were trimmed from a stream."""
        for partition in sorted(subscription.partitions):
            oldest = await self._hub.oldest_kept(partition)
            latest = joined[partition]
            lost = (oldest is not None and oldest > cursor[partition].n + 1) or (
                oldest is None and latest.n > cursor[partition].n)
            if lost:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                    f"cursor: older than the retention of partition "
                                    f"{partition}; events after it were dropped")
        return cursor

    async def _deliver(self, subscription: Subscription, joined: Mapping[int, Position],
                       context: _Context, send: _Sender, linger_s: float) -> None:
        for partition, until in sorted(joined.items()):
            while True:
                batch = await self._hub.read_range(
                    partition, subscription.positions[partition], until)
                if not batch:
                    break
                await send(subscription, batch, context)
        queue = subscription.queue
        while True:
            # everything queued meanwhile goes out in this turn: one wake-up per burst
            events = [await queue.get()]
            if linger_s > 0:
                await _linger(subscription, linger_s)
            while not queue.empty():
                events.append(queue.get_nowait())
            await send(subscription, events, context)

    async def _send(self, subscription: Subscription, events: Iterable[StreamEvent],
                    context: _Context) -> None:
        for event in events:
            if not subscription.is_new(event):
                continue
            subscription.positions[event.partition] = event.position
            if subscription.matches(event):
                await context.write(
                    event_message_bytes(event, encode_cursor(subscription.positions)))
                self._count_delivered(1, "Subscribe")

    async def _send_batch(self, subscription: Subscription, events: Iterable[StreamEvent],
                          context: _Context) -> None:
        batch: list[bytes] = []
        for event in events:
            if not subscription.is_new(event):
                continue
            subscription.positions[event.partition] = event.position
            if subscription.matches(event):
                batch.append(encoded_event_in_batch(event))
                if len(batch) >= MAX_BATCH_EVENTS:
                    await context.write(
                        batch_message_bytes(batch, encode_cursor(subscription.positions)))
                    self._count_delivered(len(batch), "SubscribeBatches")
                    batch = []
        if batch:
            await context.write(
                batch_message_bytes(batch, encode_cursor(subscription.positions)))
            self._count_delivered(len(batch), "SubscribeBatches")
