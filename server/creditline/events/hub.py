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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from creditline.errors import MalformedEntryError
from creditline.store.contract import EVENT_TYPES
from creditline.store.store import event_counter_key, events_key
from creditline.store.transport import Transport

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
# How long a blocking read may take before it counts as failed.
READ_TIMEOUT_S = READ_BLOCK_MS / 1000 + 5
# How long stopping waits for the readers (each is at most one blocking read away).
STOP_TIMEOUT_S = READ_BLOCK_MS / 1000 + 5
# Events in one SubscribeBatches message at most (a queue holds more: several messages).
MAX_BATCH_EVENTS = 1000
STANDARD_FIELDS = frozenset({"t", "a", "s", "ts", "rg", "units", "amount", "balance"})
_CURSOR_PART = re.compile(r"(\d+)=(\d+-\d+)/(\d+)")


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
        if event.fields.get("t") not in EVENT_TYPES:
            raise MalformedEntryError(f"entry {sid}: unknown event type "
                                      f"{event.fields.get('t', '')[:40]!r}")
    return decoded


def _fields(raw: list[Any]) -> dict[Any, Any]:
    """An entry's fields as the transport gives them (RESP's flat list), by name."""
    return dict(zip(raw[::2], raw[1::2], strict=True))


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
            set_done(self.batch_full)

    def is_new(self, event: StreamEvent) -> bool:
        """False for an event at or before this subscription's position: already sent."""
        seen = self.positions.get(event.partition, START)
        return event.position.n > seen.n


def set_done(future: asyncio.Future[None]) -> None:
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

    def __init__(self, transport: Transport, partitions: int, read_together: bool,
                 reader: Callable[[], Transport]) -> None:
        """transport: for the reads that do not block (the Store's); reader: makes the
        transport of each reader."""
        self.transport = transport
        self.partitions = partitions
        self._read_together = read_together
        # each reader's blocking XREAD holds a connection: a transport of its own (the
        # lean one reads at a third of redis-py's cost per read)
        self._reader = reader
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

    def lag(self) -> int:
        """Events read for a subscriber and not yet written to it, the most of any of
        this process's subscribers (creditline.hub.lag)."""
        return max((subscription.queue.qsize() for subscription in self.subscriptions),
                   default=0)

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

    async def _range(self, partition: int, command: str, *bounds: str | int
                     ) -> list[tuple[Any, dict[Any, Any]]]:
        """XRANGE or XREVRANGE of a partition's stream: (stream id, fields) per entry."""
        key = events_key(partition)
        reply: Any = await self.transport.command(key, command, key, *bounds)
        return [(stream_id, _fields(raw)) for stream_id, raw in reply]

    async def latest(self, partition: int) -> Position:
        """The position after the last event written to a partition so far."""
        newest = await self._range(partition, "XREVRANGE", "+", "-", "COUNT", 1)
        if newest:
            stream_id, raw = newest[0]
            number = _entry_number(raw)
            if number is not None:
                return Position(number, _text(stream_id))
        # empty stream (everything written so far, if anything, was trimmed), or its
        # newest entry has no number: the count of events written
        counter = event_counter_key(partition)
        written = int(await self.transport.command(counter, "GET", counter) or 0)
        return Position(written, _text(newest[0][0]) if newest else "0-0")

    async def oldest_kept(self, partition: int) -> int | None:
        """The number of the oldest event still kept in a partition, or None if empty."""
        oldest = await self._range(partition, "XRANGE", "-", "+", "COUNT", 1)
        if not oldest:
            return None
        try:
            return decode_entry(partition, *oldest[0])[0].position.n
        except MalformedEntryError:
            return _entry_number(oldest[0][1]) or 0

    async def _read_forever(self, group: tuple[int, ...]) -> None:
        keys = {events_key(p): p for p in group}
        states = [self._partitions[p] for p in group]
        transport = self._reader()
        try:
            while not self._stopping and any(state.listeners > 0 for state in states):
                await self._read_once(transport, keys)
        finally:
            await transport.aclose()
            # Checked and removed in one step (no await): a join either saw this reader
            # still running with its listener counted (so it went on), or sees it gone.
            for partition in group:
                if self._readers.get(partition) is asyncio.current_task():
                    del self._readers[partition]
                    del self.positions[partition]

    async def _read_once(self, transport: Transport, keys: Mapping[str, int]) -> None:
        ids = [self.positions[p].stream_id for p in keys.values()]
        try:
            # a Redis that stops answering without closing must not hold the reader
            async with asyncio.timeout(READ_TIMEOUT_S):
                replies: Any = await transport.command(
                    next(iter(keys)), "XREAD", "COUNT", READ_BATCH, "BLOCK", READ_BLOCK_MS,
                    "STREAMS", *keys, *ids)
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
            fields = _fields(raw)
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
            entries = await self._range(partition, "XRANGE", start, until.stream_id,
                                        "COUNT", READ_BATCH)
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
