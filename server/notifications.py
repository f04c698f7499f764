"""Charge notifications: one Redis reader per process fans events out to subscribers.

The charging scripts append every event to its partition's stream, the events of one
request together in one stream entry (see charge.lua, KEYS[7]). The `EventHub` reads the
partition streams (one XREAD of them all on one Redis server, one per partition on a
cluster, whose streams sit on different nodes), and offers each event to the
subscriptions whose filters match. Each subscription has a bounded queue: one that falls
behind is ended with RESOURCE_EXHAUSTED and the cursor to resume from, so a slow
subscriber never slows charging or the other subscribers.

A partition is read only while a subscription covers it: the first subscription of a
partition starts its reader at the stream's newest entry, and the reader stops after the
read during which the partition's last subscription left. A server without subscribers
reads nothing.

A cursor is the position of a subscription in every partition it reads: per partition,
the stream id of the entry holding the last event delivered and that event's number `n`
(a subscriber may stop between two events of one entry). Resuming reads the
streams from there up to where the hub's reader was when the subscription joined (for a
reader started by that join: the newest entry then), then takes the hub's live events;
positions drop anything already delivered, so nothing is lost or delivered twice.

Each event is encoded once for all its subscribers (a subscriber's message is that
encoding with its cursor appended). SubscribeBatches writes every queued event in one
message, and with `batch_linger_s` waits that long after a batch's first event for more:
each gRPC write costs the server far more than the events it carries.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from creditline.fastredis import FastScriptClient
from creditline.security import Role, current_principal
from creditline.settings import MAX_BATCH_LINGER_S
from creditline.store import RedisClient, event_counter_key, events_key, partition_of
from creditline.telemetry import Metrics
from creditline.v1 import notifications_pb2 as pb
from creditline.v1 import notifications_pb2_grpc
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

RESUME_CURSOR_METADATA = "creditline-resume-cursor"
# Sent in the initial metadata once the subscription is live: a client that waits for it
# knows every later charge reaches it, and holds a cursor before the first event.
START_CURSOR_METADATA = "creditline-start-cursor"
# Entries per XREAD / XRANGE call: bounds the memory of one read.
READ_BATCH = 500
READ_BLOCK_MS = 1000
# How long the hub waits before reading again after Redis failed.
RETRY_PAUSE_S = 0.5
# How long a blocking read on the lean connection may take before it counts as failed.
LEAN_READ_TIMEOUT_S = READ_BLOCK_MS / 1000 + 5
# How long stopping waits for the readers (each is at most one blocking read away).
STOP_TIMEOUT_S = READ_BLOCK_MS / 1000 + 5
# Events in one SubscribeBatches message at most (a queue holds more: several messages).
MAX_BATCH_EVENTS = 1000
_STANDARD_FIELDS = frozenset({"t", "a", "s", "ts", "rg", "units", "amount", "balance"})
_CURSOR_PART = re.compile(r"(\d+)=(\d+-\d+)/(\d+)")
# The event types as the scripts write them ("quota_granted", ...)
_EVENT_TYPE_NAMES = frozenset(name.lower() for name in pb.EventType.DESCRIPTOR.values_by_name
                              if name != "EVENT_TYPE_UNSPECIFIED")


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where a reader is in one partition stream: after event number `n`, which entry
    `stream_id` holds."""

    n: int
    stream_id: str


START = Position(0, "0-0")


def encode_cursor(positions: Mapping[int, Position]) -> str:
    return ",".join(f"{p}={pos.stream_id}/{pos.n}" for p, pos in sorted(positions.items()))


def decode_cursor(cursor: str) -> dict[int, Position]:
    positions: dict[int, Position] = {}
    for part in cursor.split(","):
        match = _CURSOR_PART.fullmatch(part)
        if not match:
            raise ValueError(f"cursor: {part[:40]!r} is not <partition>=<stream id>/<number>")
        positions[int(match[1])] = Position(int(match[3]), match[2])
    return positions


@dataclass(slots=True)
class StreamEvent:
    partition: int
    position: Position
    fields: Mapping[str, str]
    # its place among the events of its stream entry (one entry per charging request)
    index: int = 0
    # the encoded ChargeEvent without its cursor, made once for all the subscribers that
    # get it, and the same as one entry of a ChargeEventBatch (see encoded_event)
    encoded: bytes | None = field(default=None, compare=False, repr=False)
    encoded_in_batch: bytes | None = field(default=None, compare=False, repr=False)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MalformedEntryError(ValueError):
    """A stream entry that is not one the scripts write (written by hand, say)."""


def decode_entry(partition: int, stream_id: bytes | str, raw: Mapping[Any, Any]
                 ) -> list[StreamEvent]:
    """The events of one stream entry, in order (the layout: charge.lua, KEYS[7]). The
    entry's fields other than `n` and `e` (account, session, time, a top-up id) are every
    one of its events'; `e` holds the events, `n` numbers the last of them. Raises
    MalformedEntryError for an entry the scripts would not write."""
    common = {_text(key): _text(value) for key, value in raw.items()}
    sid = _text(stream_id)
    try:
        last = int(common.pop("n", ""))
    except ValueError:
        raise MalformedEntryError(f"entry {sid}: no event number") from None
    if "e" not in common:  # an entry of one event, as written before 2026-12-02: its fields
        decoded = [StreamEvent(partition, Position(last, sid), common)]
    else:
        events = common.pop("e").split(";")
        first = last - len(events) + 1
        decoded = []
        for index, packed in enumerate(events):
            parts = packed.split("|")
            if len(parts) % 2 == 0:
                raise MalformedEntryError(f"entry {sid}: event {index} has a field without "
                                          "a value")
            fields = dict(common)
            fields["t"] = parts[0]
            fields.update(zip(parts[1::2], parts[2::2], strict=True))
            decoded.append(StreamEvent(partition, Position(first + index, sid), fields, index))
    for event in decoded:
        if event.fields.get("t") not in _EVENT_TYPE_NAMES:
            raise MalformedEntryError(f"entry {sid}: unknown event type "
                                      f"{event.fields.get('t', '')[:40]!r}")
    return decoded


def _entry_number(raw: Mapping[Any, Any]) -> int | None:
    """The number of an entry's last event, without decoding its events; None for an
    entry without one (not written by the scripts)."""
    text = _text(raw.get(b"n", raw.get("n", b"")))
    return int(text) if text.isdigit() else None


@dataclass(eq=False)
class Subscription:
    partitions: frozenset[int]
    account_ids: frozenset[str] | None
    event_types: frozenset[str] | None
    queue: asyncio.Queue[StreamEvent]
    positions: dict[int, Position] = field(default_factory=dict)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    # while a batch lingers: set when the queue holds `full_batch` events, so that a
    # lingering batch goes out before the queue overflows
    batch_full: asyncio.Future[None] | None = None

    @property
    def full_batch(self) -> int:
        """Half the queue (at most a batch's MAX_BATCH_EVENTS): a lingering batch leaves
        with that many, long before the queue could overflow."""
        if self.queue.maxsize <= 0:  # unbounded
            return MAX_BATCH_EVENTS
        return min(MAX_BATCH_EVENTS, max(1, self.queue.maxsize // 2))

    def matches(self, event: StreamEvent) -> bool:
        if self.account_ids is not None and event.fields.get("a") not in self.account_ids:
            return False
        return self.event_types is None or event.fields.get("t") in self.event_types

    def offer(self, event: StreamEvent) -> None:
        if event.partition not in self.partitions or not self.matches(event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()
        if self.batch_full is not None and self.queue.qsize() >= self.full_batch:
            _set_done(self.batch_full)

    def is_new(self, event: StreamEvent) -> bool:
        """False for an event at or before this subscription's position: already sent."""
        seen = self.positions.get(event.partition, START)
        return event.position.n > seen.n


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class _Partition:
    """The subscriptions of one partition, indexed so that an event is offered only to
    those that may want it (not to every subscriber of the process)."""

    by_account: dict[str, set[Subscription]] = field(default_factory=dict)
    every_account: set[Subscription] = field(default_factory=set)
    # joins under way (waiting for the stream's newest entry) count as listeners too
    listeners: int = 0

    def add(self, subscription: Subscription) -> None:
        if subscription.account_ids is None:
            self.every_account.add(subscription)
            return
        for account_id in subscription.account_ids:
            self.by_account.setdefault(account_id, set()).add(subscription)

    def discard(self, subscription: Subscription) -> None:
        self.every_account.discard(subscription)
        for account_id in subscription.account_ids or ():
            subscribers = self.by_account.get(account_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self.by_account[account_id]

    def wants(self, account_id: str) -> bool:
        return bool(self.every_account) or account_id in self.by_account

    def offer(self, event: StreamEvent) -> None:
        for subscription in self.by_account.get(event.fields.get("a", ""), ()):
            subscription.offer(event)
        for subscription in self.every_account:
            subscription.offer(event)


class EventHub:
    """The one reader of the partition streams in this process, reading a partition only
    while a subscription covers it.

    With `read_together` (one Redis server, not a cluster) one task reads every partition
    with one XREAD of all the streams, started by the first subscription and stopped
    after the last one left: a reader per partition got one or two entries per XREAD
    under load, and redis-py's cost per call was 17 % of the server's CPU with 100
    subscribers (py-spy). In a cluster the streams sit on different nodes (one XREAD
    cannot name them all): one task per partition, for the partitions subscribed."""

    def __init__(self, redis: RedisClient, partitions: int, read_together: bool = False,
                 lean: FastScriptClient | None = None) -> None:
        self.redis = redis
        self.partitions = partitions
        self._read_together = read_together
        # the shared XREAD through the lean hiredis connection (fastredis) when Redis allows
        # it (one server, not a cluster): a third of redis-py's cost per read
        self._lean = lean if read_together else None
        # of the partitions being read: the position after the last event read
        self.positions: dict[int, Position] = {}
        self.subscriptions: set[Subscription] = set()
        self._partitions: dict[int, _Partition] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        self._fetching: dict[tuple[int, ...], asyncio.Future[dict[int, Position]]] = {}
        self._stopping = False

    async def start(self) -> None:
        """Nothing is read until a subscription joins (join starts the readers)."""

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel that lands while redis-py waits for a
        # pooled connection can come back as a connection error, which the loop survives.
        self._stopping = True
        tasks = set(self._readers.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)
        if self._lean is not None:
            await self._lean.aclose()

    def reading(self, partition: int) -> bool:
        return partition in self._readers

    async def join(self, subscription: Subscription) -> dict[int, Position]:
        """Adds a subscription and returns, per partition it covers, the position after
        which every event reaches its queue; the events up to it are the caller's to read
        (read_range). A partition nobody read gets a reader starting at its newest entry."""
        for partition in subscription.partitions:
            # from here on no reader of these partitions stops (see _read_forever)
            self._partitions.setdefault(partition, _Partition()).listeners += 1
        groups = {self._group(p) for p in subscription.partitions if p not in self._readers}
        newest: dict[int, Position] = {}
        try:
            for group in groups:
                newest.update(await asyncio.shield(self._newest(group)))
        except BaseException:
            self._release(subscription.partitions)
            raise
        # No await from here on: the readers started and the subscription added at once.
        for partition in subscription.partitions:
            if partition not in self._readers:  # else a concurrent join started it
                self._start_reader(self._group(partition), newest)
            self._partitions[partition].add(subscription)
        self.subscriptions.add(subscription)
        return {p: self.positions[p] for p in subscription.partitions}

    def _newest(self, group: tuple[int, ...]) -> asyncio.Future[dict[int, Position]]:
        """The newest positions of a group's partitions, read once for all the joins that
        wait for them (a thousand subscribers joining at once read them once)."""
        fetch = self._fetching.get(group)
        if fetch is None:
            fetch = self._fetching[group] = asyncio.ensure_future(self._read_newest(group))
            fetch.add_done_callback(lambda _: self._fetching.pop(group, None))
        return fetch

    async def _read_newest(self, group: tuple[int, ...]) -> dict[int, Position]:
        positions = await asyncio.gather(*map(self.latest, group))
        return dict(zip(group, positions, strict=True))

    def _group(self, partition: int) -> tuple[int, ...]:
        """The partitions one reader reads together with this one."""
        return tuple(range(self.partitions)) if self._read_together else (partition,)

    def _start_reader(self, group: tuple[int, ...], newest: Mapping[int, Position]) -> None:
        task = asyncio.create_task(self._read_forever(group),
                                   name=f"event-hub-{group[0]}-{group[-1]}")
        for partition in group:
            self._partitions.setdefault(partition, _Partition())
            self.positions[partition] = newest[partition]
            self._readers[partition] = task

    def leave(self, subscription: Subscription) -> None:
        """Removes a subscription that joined; a reader left without subscriptions stops
        after its current read."""
        if subscription not in self.subscriptions:
            return
        self.subscriptions.discard(subscription)
        for partition in subscription.partitions:
            self._partitions[partition].discard(subscription)
        self._release(subscription.partitions)

    def _release(self, partitions: frozenset[int]) -> None:
        for partition in partitions:
            self._partitions[partition].listeners -= 1

    async def latest(self, partition: int) -> Position:
        """The position after the last event written to a partition so far."""
        newest: Any = await self.redis.xrevrange(events_key(partition), count=1)
        if newest:
            stream_id, raw = newest[0]
            number = _entry_number(raw)
            if number is not None:
                return Position(number, _text(stream_id))
        # empty stream (everything written so far, if anything, was trimmed), or its
        # newest entry has no number: the count of events written
        written = int(await self.redis.get(event_counter_key(partition)) or 0)
        return Position(written, _text(newest[0][0]) if newest else "0-0")

    async def oldest_kept(self, partition: int) -> int | None:
        """The number of the oldest event still kept in a partition, or None if empty."""
        oldest: Any = await self.redis.xrange(events_key(partition), count=1)
        if not oldest:
            return None
        try:
            return decode_entry(partition, *oldest[0])[0].position.n
        except MalformedEntryError:
            return _entry_number(oldest[0][1]) or 0

    async def _read_forever(self, group: tuple[int, ...]) -> None:
        keys = {events_key(p): p for p in group}
        states = [self._partitions[p] for p in group]
        try:
            while not self._stopping and any(state.listeners > 0 for state in states):
                await self._read_once(keys)
        finally:
            # Checked and removed in one step (no await): a join either saw this reader
            # still running with its listener counted (so it went on), or sees it gone.
            for partition in group:
                if self._readers.get(partition) is asyncio.current_task():
                    del self._readers[partition]
                    del self.positions[partition]

    async def _read_once(self, keys: Mapping[str, int]) -> None:
        ids = [self.positions[p].stream_id for p in keys.values()]
        try:
            if self._lean is not None:
                # a Redis that stops answering without closing must not hold the reader
                async with asyncio.timeout(LEAN_READ_TIMEOUT_S):
                    replies: Any = await self._lean.call(
                        "XREAD", "COUNT", READ_BATCH, "BLOCK", READ_BLOCK_MS, "STREAMS",
                        *keys, *ids)
            else:
                replies = await self.redis.xread(dict(zip(keys, ids, strict=True)),
                                                 count=READ_BATCH, block=READ_BLOCK_MS)
        except (RedisError, OSError) as error:
            log.warning("event hub: reading %s failed: %r", ", ".join(keys), error)
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        for name, entries in replies or []:
            partition = keys[name.decode() if isinstance(name, bytes) else name]
            self._offer_all(partition, entries)

    def _offer_all(self, partition: int, entries: Iterable[Any]) -> None:
        """Offers a partition's new entries; only those some subscription may want are
        decoded (with few subscribers most events are nobody's)."""
        state = self._partitions[partition]
        for stream_id, raw in entries:
            # redis-py gives each entry's fields as a dict, the lean connection as a list
            fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
            events: list[StreamEvent] = []
            if state.wants(_text(fields.get(b"a", b""))):
                try:
                    events = decode_entry(partition, stream_id, fields)
                except MalformedEntryError as error:
                    # skipped, never a reason to stop the hub
                    log.error("event hub: partition %d: %s; skipped", partition, error)
            if not events:  # nobody's, or skipped: the next read starts after it
                number = _entry_number(fields)
                self.positions[partition] = Position(
                    self.positions[partition].n if number is None else number,
                    _text(stream_id))
                continue
            for event in events:
                self.positions[partition] = event.position
                state.offer(event)

    async def read_range(self, partition: int, after: Position, until: Position
                         ) -> list[StreamEvent]:
        """Events of a partition after `after`, up to and including `until`, one batch."""
        if until.n <= after.n:
            return []
        # from the entry of `after` on: a subscriber may have stopped within an entry
        start = after.stream_id
        while True:
            entries: Any = await self.redis.xrange(
                events_key(partition), min=start, max=until.stream_id, count=READ_BATCH)
            events = []
            for sid, raw in entries:
                try:
                    decoded = decode_entry(partition, sid, raw)
                except MalformedEntryError as error:
                    log.error("event hub: partition %d: %s; skipped", partition, error)
                    continue
                events += [event for event in decoded if after.n < event.position.n <= until.n]
            # an empty answer means the range is done: not for a batch of skipped entries
            if events or len(entries) < READ_BATCH:
                return events
            start = f"({_text(entries[-1][0])}"


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
        if key not in _STANDARD_FIELDS:
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
    timer = loop.call_later(linger_s, _set_done, batch_full)
    try:
        await batch_full
    finally:
        timer.cancel()
        subscription.batch_full = None


# Subscribe writes encoded ChargeEvent messages, SubscribeBatches ChargeEventBatch ones.
_Context = grpc.aio.ServicerContext[pb.SubscribeRequest, bytes]
# How a subscription's events are written: one message each, or in batches.
_Sender = Callable[[Subscription, Iterable[StreamEvent], _Context], Awaitable[None]]


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
            else (partition_of(a, self._hub.partitions) for a in accounts))
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
                    batch = []
        if batch:
            await context.write(
                batch_message_bytes(batch, encode_cursor(subscription.positions)))
