"""Charge notifications: every charge reaches subscribers, filtered, in order, resumable."""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from typing import Any

import grpc
import pytest
from creditline.events.hub import (
    RESUME_CURSOR_METADATA,
    START_CURSOR_METADATA,
    decode_entry,
)
from creditline.store.contract import USAGE_RATES_FORMAT
from creditline.store.store import account_keys, event_counter_key
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import notifications_pb2 as npb
from redis.asyncio import Redis

from tests.messages import RG_SMS, RG_WEB, block, ccr
from tests.waiting import until

READ_TIMEOUT_S = 5.0


class Subscriber:
    """A subscription read without cancelling it: a read that times out stays pending
    (cancelling a read would cancel the whole call)."""

    def __init__(self, call, start_cursor: str) -> None:  # type: ignore[no-untyped-def]
        self.call = call
        self.start_cursor = start_cursor
        self._pending: asyncio.Future[npb.ChargeEvent] | None = None

    async def next(self, timeout_s: float = READ_TIMEOUT_S) -> npb.ChargeEvent:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            raise TimeoutError
        event, self._pending = self._pending.result(), None
        return event

    async def read(self, count: int) -> list[npb.ChargeEvent]:
        return [await self.next() for _ in range(count)]

    async def no_more(self) -> None:
        with pytest.raises(asyncio.TimeoutError):
            await self.next(0.3)

    async def drain(self) -> list[npb.ChargeEvent]:
        events = []
        while True:
            try:
                events.append(await self.next(0.5))
            except TimeoutError:
                return events

    def cancel(self) -> None:
        self.call.cancel()

    async def close(self) -> None:
        """Cancels the call and takes the end of a read still pending (else asyncio says
        its exception was never retrieved)."""
        self.call.cancel()
        if self._pending is not None:
            await asyncio.wait({self._pending})
            if not self._pending.cancelled():
                self._pending.exception()


async def subscribe(notifications, **filters) -> Subscriber:  # type: ignore[no-untyped-def]
    """Starts a subscription and waits until it is live (its start cursor arrives)."""
    call = notifications.Subscribe(npb.SubscribeRequest(**filters))
    metadata = dict(await asyncio.wait_for(call.initial_metadata(), READ_TIMEOUT_S))
    return Subscriber(call, metadata[START_CURSOR_METADATA])


def types(events: list[npb.ChargeEvent]) -> list[str]:
    return [npb.EventType.Name(e.type) for e in events]


async def sms(charging, acct: str, sid: str, action=pb.DIRECT_DEBIT, count: int = 1,  # type: ignore[no-untyped-def]
              refund_of: str = ""):
    return await charging.Event(pb.EventRequest(
        session_id=sid, account_id=acct, action=action,
        rating_groups=[block(RG_SMS, requested=count)], refund_of_session_id=refund_of))


async def test_filters_deliver_exactly_the_matching_events_in_order(
        charging, notifications, make_account, checked_books):  # type: ignore[no-untyped-def]
    alice = await make_account(balance_micros=10_000_000)
    bob = await make_account(balance_micros=10_000_000)
    only_alice = await subscribe(notifications, account_ids=[alice])
    alice_refunds = await subscribe(notifications, account_ids=[alice, bob],
                                       event_types=[npb.EVENT_REFUNDED])
    for n in range(5):
        await sms(charging, bob, f"b{n}")
        await sms(charging, alice, f"a{n}", count=n + 1)
    await sms(charging, alice, "refund", action=pb.REFUND, refund_of="a0")

    events = await only_alice.read(6)
    assert types(events) == ["EVENT_CHARGED"] * 5 + ["EVENT_REFUNDED"]
    assert [e.units for e in events] == [1, 2, 3, 4, 5, 1]
    assert [e.balance_micros for e in events[:2]] == [9_950_000, 9_850_000]
    assert all(e.account_id == alice for e in events)
    assert [e.session_id for e in events] == ["a0", "a1", "a2", "a3", "a4", "refund"]
    refunds = await alice_refunds.read(1)
    assert refunds[0].account_id == alice and refunds[0].amount_micros == 50_000
    await only_alice.no_more()
    await alice_refunds.no_more()
    only_alice.cancel()
    alice_refunds.cancel()


async def scenario_events(notifications, make_account, run, **account) -> Counter[str]:  # type: ignore[no-untyped-def]
    acct = await make_account(**account)
    subscriber = await subscribe(notifications, account_ids=[acct])
    await run(acct)
    events = await subscriber.drain()
    subscriber.cancel()
    return Counter(types(events))


async def test_each_event_type_comes_from_its_scenario_and_no_other(
        charging, admin, notifications, make_account, checked_books):  # type: ignore[no-untyped-def]
    async def session(acct: str) -> None:
        await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_WEB, requested=1_024)))
        await charging.Update(ccr(f"{acct};s", acct, 1, block(RG_WEB, requested=1_024,
                                                                used=1_024)))
        await charging.Terminate(ccr(f"{acct};s", acct, 2, block(RG_WEB, used=10)))

    async def debit_and_refund(acct: str) -> None:
        await sms(charging, acct, "e")
        await sms(charging, acct, "r", action=pb.REFUND, refund_of="e")

    async def exhaust(acct: str) -> None:
        await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_WEB, requested=4_096)))
        await charging.Update(ccr(f"{acct};s", acct, 1, block(RG_WEB, requested=4_096,
                                                                used=4_096)))

    async def top_up_after_final_units(acct: str) -> None:
        await exhaust(acct)
        await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=10_000,
                                                top_up_id="t1"))

    async def expire_bucket(acct: str) -> None:
        await charging.Initial(ccr(f"{acct};s", acct, 0, block(RG_WEB, requested=1_024)))

    expired = admin_pb.Bucket(bucket_id="old", rating_group=RG_WEB, unit_kind=admin_pb.VOLUME,
                              initial_units=100, expires_at_unix_s=int(time.time()) - 1)
    cases = [
        (session, {"balance_micros": 1_000_000},
         {"QUOTA_GRANTED": 2, "USAGE_CHARGED": 2, "SESSION_ENDED": 1}),
        (lambda a: sms(charging, a, "e"), {"balance_micros": 1_000_000}, {"EVENT_CHARGED": 1}),
        (debit_and_refund, {"balance_micros": 1_000_000},
         {"EVENT_CHARGED": 1, "EVENT_REFUNDED": 1}),
        (lambda a: sms(charging, a, "c", action=pb.CHECK_BALANCE), {}, {}),
        (lambda a: sms(charging, a, "x", count=10), {"balance_micros": 100},
         {"CREDIT_EXHAUSTED": 1}),
        (lambda a: sms(charging, a, "l", count=2),
         {"balance_micros": 200_000, "low_balance_thresholds_micros": [150_000, 120_000, 50_000]},
         {"EVENT_CHARGED": 1, "LOW_BALANCE": 2}),
        # 4 KiB of money: the first grant is the last (final), the next ask is refused
        (exhaust, {"balance_micros": 4_000},
         {"QUOTA_GRANTED": 1, "FINAL_UNITS_GRANTED": 1, "USAGE_CHARGED": 1,
          "CREDIT_EXHAUSTED": 1}),
        (top_up_after_final_units, {"balance_micros": 4_000},
         {"QUOTA_GRANTED": 1, "FINAL_UNITS_GRANTED": 1, "USAGE_CHARGED": 1,
          "CREDIT_EXHAUSTED": 1, "TOP_UP": 1, "REAUTHORIZATION_NEEDED": 1}),
        (expire_bucket, {"balance_micros": 1_000_000, "buckets": [expired]},
         {"QUOTA_GRANTED": 1, "BUCKET_EXPIRED": 1}),
    ]
    for run, account, expected in cases:
        got = await scenario_events(notifications, make_account, run, **account)
        assert got == Counter({k: v for k, v in expected.items() if v}), (expected, got)


async def test_usage_spike_against_the_accounts_own_rate(
        charging, notifications, make_account, settings, redis_process):  # type: ignore[no-untyped-def]
    redis_binary = Redis.from_url(redis_process.url)  # (the rates are bytes, not text)
    acct = await make_account(balance_micros=10**12)
    call = await subscribe(notifications, account_ids=[acct], event_types=[npb.USAGE_SPIKE])
    start_ms = 1_700_000_000_000
    step_s = 1_800
    # a day and a half of steady use: 10 messages every half hour, no spike
    for n in range(int(1.5 * settings.spike_slow_window_s / step_s)):
        await charging.Event(pb.EventRequest(
            session_id=f"steady{n}", account_id=acct, action=pb.DIRECT_DEBIT,
            event_time_unix_ms=start_ms + n * step_s * 1000,
            rating_groups=[block(RG_SMS, requested=10)]))
    await call.no_more()
    burst_ms = start_ms + (n + 1) * step_s * 1000
    for k in range(3):  # a burst: 1000 messages a minute; announced once
        await charging.Event(pb.EventRequest(
            session_id=f"burst{k}", account_id=acct, action=pb.DIRECT_DEBIT,
            event_time_unix_ms=burst_ms + k * 60_000,
            rating_groups=[block(RG_SMS, requested=1_000)]))
    (spike,) = await call.read(1)
    assert spike.type == npb.USAGE_SPIKE and spike.rating_group == str(RG_SMS)
    assert float(spike.details["rate_per_s"]) > 20 * float(spike.details["usual_rate_per_s"])
    await call.no_more()
    call.cancel()
    # the rates as the script keeps them (contract.USAGE_RATES_FORMAT): the spike announced,
    # at the burst's last event, the history from the first
    stored = await redis_binary.hget(account_keys(acct, settings.partitions).rates,
                                     str(RG_SMS))
    fast, slow, at_ms, since_ms, spike_on = struct.unpack(USAGE_RATES_FORMAT, stored)
    assert (at_ms, since_ms, spike_on) == (burst_ms + 120_000, start_ms, 1)
    assert fast > 20 * slow > 0
    await redis_binary.aclose()


async def test_resume_from_cursor_loses_and_duplicates_nothing_under_load(
        charging, notifications, make_account, redis, settings, checked_books):  # type: ignore[no-untyped-def]
    accounts = [await make_account(balance_micros=10**12) for _ in range(3)]
    call = await subscribe(notifications, account_ids=accounts)
    received: list[npb.ChargeEvent] = []

    async def load() -> None:
        for n in range(150):
            await asyncio.gather(*(sms(charging, a, f"{a};{n}") for a in accounts))

    loader = asyncio.create_task(load())
    for _ in range(4):  # read a little, drop the connection, resume from the last cursor
        batch = await call.read(40)
        received += batch
        call.cancel()
        call = await subscribe(notifications, account_ids=accounts, cursor=batch[-1].cursor)
    await loader
    while len(received) < 450:
        received += await call.read(1)
    await call.no_more()
    call.cancel()

    expected = {}
    for acct in accounts:  # the ground truth: the streams in Redis
        keys = account_keys(acct, settings.partitions)
        for stream_id, fields in await redis.xrange(keys.events):
            for event in decode_entry(keys.partition, stream_id, fields):
                if event.fields["a"] == acct:
                    expected[f"{keys.partition}-{stream_id}-{event.index}"] = event.fields["s"]
    for acct in accounts:  # in order per account
        ids = [tuple(map(int, e.event_id.split("-"))) for e in received if e.account_id == acct]
        assert ids == sorted(ids)
    assert Counter(e.event_id for e in received) == Counter(expected.keys())  # none lost or twice


async def test_a_requests_events_share_an_entry_and_a_cursor_within_it_resumes_exactly(
        charging, notifications, make_account, redis, settings, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000_000)
    watching = await subscribe(notifications, account_ids=[acct])
    answer = await charging.Initial(ccr(f"{acct};two-groups", acct, 0,
                                        block(RG_WEB, requested=1000),
                                        block(RG_SMS, requested=2)))
    assert answer.result_code == pb.SUCCESS
    events = await watching.drain()
    watching.cancel()
    assert types(events)[:2] == ["QUOTA_GRANTED", "QUOTA_GRANTED"]
    # one stream entry for the request: the ids share its stream id, then count 0, 1, ...
    entries = await redis.xrange(account_keys(acct, settings.partitions).events)
    assert [fields["s"] for _, fields in entries if fields["a"] == acct] == [f"{acct};two-groups"]
    assert {e.event_id.rsplit("-", 1)[0] for e in events} == {
        f"{account_keys(acct, settings.partitions).partition}-{entries[-1][0]}"}
    assert [e.event_id.rsplit("-", 1)[1] for e in events] == [
        str(i) for i in range(len(events))]
    # a subscriber that stopped after the first event gets the rest of the entry, once
    resumed = await subscribe(notifications, account_ids=[acct], cursor=events[0].cursor)
    rest = await resumed.read(len(events) - 1)
    await resumed.no_more()
    resumed.cancel()
    assert [(e.event_id, e.type) for e in rest] == [(e.event_id, e.type) for e in events[1:]]
    after_all = await subscribe(notifications, account_ids=[acct], cursor=events[-1].cursor)
    await after_all.no_more()
    after_all.cancel()


async def test_entries_of_one_event_each_as_written_before_are_still_delivered(
        charging, notifications, make_account, redis, settings, checked_books):  # type: ignore[no-untyped-def]
    # a Redis written by the version before one entry per request: its entries resume too
    acct = await make_account(balance_micros=10_000_000)
    keys = account_keys(acct, settings.partitions)
    cursor = (await subscribe(notifications, account_ids=[acct])).start_cursor
    number = await redis.incr(event_counter_key(keys.partition))
    await redis.xadd(keys.events, {"t": "top_up", "a": acct, "ts": "1", "amount": "5",
                                   "balance": "10000005", "top_up_id": "old", "n": number})
    await sms(charging, acct, "after")
    resumed = await subscribe(notifications, account_ids=[acct], cursor=cursor)
    old, new = await resumed.read(2)
    resumed.cancel()
    assert (old.type, old.amount_micros, old.details["top_up_id"]) == (npb.TOP_UP, 5, "old")
    assert (new.type, new.session_id) == (npb.EVENT_CHARGED, "after")


async def test_entries_the_scripts_would_not_write_are_skipped_not_fatal(
        charging, notifications, make_account, redis, settings, checked_books):  # type: ignore[no-untyped-def]
    # written by hand into the stream: the hub logs and skips them, live and on resume
    acct = await make_account(balance_micros=10_000_000)
    keys = account_keys(acct, settings.partitions)
    live = await subscribe(notifications, account_ids=[acct])
    await sms(charging, acct, "before")
    number = await redis.get(event_counter_key(keys.partition))
    bad_ids = [await redis.xadd(keys.events, bad) for bad in (
        {"a": acct, "e": "event_charged"},                       # no number
        {"a": acct, "n": number, "e": "event_charged|units"},    # a field, no value
        {"a": acct, "n": number, "e": "no_such_type"})]
    try:
        await sms(charging, acct, "after")
        events = await live.read(2)
        await live.no_more()
        live.cancel()
        assert [e.session_id for e in events] == ["before", "after"]
        resumed = await subscribe(notifications, account_ids=[acct], cursor=events[0].cursor)
        [after] = await resumed.read(1)
        await resumed.no_more()
        resumed.cancel()
        assert after.event_id == events[1].event_id
    finally:  # the other tests read the shared streams as the scripts write them
        await redis.xdel(keys.events, *bad_ids)


async def test_batches_carry_the_same_events_and_resume_from_a_batch_cursor(
        charging, notifications, make_account, checked_books):  # type: ignore[no-untyped-def]
    accounts = [await make_account(balance_micros=10**12) for _ in range(3)]
    watched = accounts[:2]
    # the single-event stream is the reference for what the batches must carry
    reference = await subscribe(notifications, account_ids=watched,
                                event_types=[npb.EVENT_CHARGED])

    async def open_batches(cursor: str = "") -> Any:
        call = notifications.SubscribeBatches(npb.SubscribeRequest(
            account_ids=watched, event_types=[npb.EVENT_CHARGED], cursor=cursor))
        await asyncio.wait_for(call.initial_metadata(), READ_TIMEOUT_S)
        return call

    async def load() -> None:
        for n in range(100):
            await asyncio.gather(*(sms(charging, a, f"{a};{n}") for a in accounts))

    batches = await open_batches()
    loader = asyncio.create_task(load())
    received: list[npb.ChargeEvent] = []
    for _ in range(3):  # read a batch or two, drop the connection, resume from the cursor
        batch = await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)
        assert batch.events and all(not e.cursor for e in batch.events)
        received += batch.events
        batches.cancel()
        batches = await open_batches(batch.cursor)
    await loader
    while len(received) < 200:
        received += (await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)).events
    batches.cancel()

    expected = await reference.read(200)
    await reference.no_more()
    reference.cancel()
    assert len(received) == 200  # none lost, none twice
    for acct in watched:  # the same events, in the same order per account
        assert ([e.event_id for e in received if e.account_id == acct]
                == [e.event_id for e in expected if e.account_id == acct])


async def test_thousand_subscribers_each_get_the_charge(
        charging, notifications, make_account):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10**9)
    calls = [notifications.Subscribe(npb.SubscribeRequest(account_ids=[acct]))
             for _ in range(1_000)]
    await asyncio.gather(*(asyncio.wait_for(c.initial_metadata(), 30) for c in calls))
    await sms(charging, acct, "for-all")
    events = await asyncio.gather(*(asyncio.wait_for(c.read(), 30) for c in calls))
    assert {(e.type, e.session_id) for e in events} == {(npb.EVENT_CHARGED, "for-all")}
    for c in calls:
        c.cancel()


async def test_stalled_subscriber_is_ended_with_its_cursor_while_charging_goes_on(
        server, charging, make_account, settings):  # type: ignore[no-untyped-def]
    from creditline.v1 import notifications_pb2_grpc

    acct = await make_account(balance_micros=10**12)
    # a client that never reads, with flow control windows as small as gRPC allows
    options = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        stalled = notifications_pb2_grpc.NotificationsStub(ch).Subscribe(
            npb.SubscribeRequest(account_ids=[acct]))
        await stalled.initial_metadata()
        answers = []
        for n in range(settings.subscriber_queue_size + 2_000):
            answers.append(await sms(charging, acct, f"s{n}"))
        assert all(a.result_code == pb.SUCCESS for a in answers)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await asyncio.wait_for(stalled.read(), READ_TIMEOUT_S)
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(ended.value.trailing_metadata() or ())
        assert trailing[RESUME_CURSOR_METADATA] in (ended.value.details() or "")


async def test_cursor_older_than_retention_is_refused(
        charging, notifications, make_account, redis, settings):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10**9)
    cursor = (await subscribe(notifications, account_ids=[acct])).start_cursor
    await sms(charging, acct, "gone")
    await redis.xtrim(account_keys(acct, settings.partitions).events, maxlen=0)
    call = notifications.Subscribe(npb.SubscribeRequest(account_ids=[acct], cursor=cursor))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "retention" in (refused.value.details() or "")

    bad = notifications.Subscribe(npb.SubscribeRequest(account_ids=[acct], cursor="nonsense"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await bad.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_streams_are_read_only_while_subscribed_and_resume_after_the_reader_stopped(
        redis_process, settings):  # type: ignore[no-untyped-def]
    # a server of its own: the shared one may still hold other tests' subscriptions
    from creditline.api.app import start_server, stop_server
    from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc

    running = await start_server(settings, redis_process.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)
            notifications = notifications_pb2_grpc.NotificationsStub(channel)
            acct = f"lazy-{time.time_ns()}"
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(
                admin_pb.CreateAccountRequest(account_id=acct, initial_balance_micros=10**12))
            partition = account_keys(acct, settings.partitions).partition
            hub = running.hub
            await sms(charging, acct, "before")  # nobody subscribes: nobody reads it
            assert not hub.reading(partition)
            first = await subscribe(notifications, account_ids=[acct])
            assert hub.reading(partition)
            await sms(charging, acct, "e1")
            [e1] = await first.read(1)
            assert e1.session_id == "e1"
            first.cancel()
            # it stops after its current read
            await until(lambda: not hub.reading(partition), READ_TIMEOUT_S)
            for n in range(2, 5):  # charged while nobody reads the streams
                await sms(charging, acct, f"e{n}")
            resumed = await subscribe(notifications, account_ids=[acct], cursor=e1.cursor)
            await sms(charging, acct, "e5")
            events = await resumed.read(4)
            assert [e.session_id for e in events] == ["e2", "e3", "e4", "e5"]  # no gap, no repeat
            await resumed.no_more()
            resumed.cancel()
    finally:
        await stop_server(running, grace_s=1.0)


async def test_lingering_batches_gather_events_and_leave_early_when_the_queue_fills(
        redis_process, settings):  # type: ignore[no-untyped-def]
    # a server of its own: batches wait up to a second for more events, and a queue of 40
    # events sends a batch once it holds 20 (half the queue) instead of overflowing (room
    # for the hub's reads to offer a few events at once on a busy machine)
    from creditline.api.app import start_server, stop_server
    from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc, notifications_pb2_grpc

    from tests.conftest import settings_with

    linger_s = 1.0
    running = await start_server(settings_with(
        settings, subscriber_batch_linger_s=linger_s, subscriber_queue_size=40),
        redis_process.url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            charging = charging_pb2_grpc.ChargingStub(channel)
            acct = f"linger-{time.time_ns()}"
            await admin_pb2_grpc.AdminStub(channel).CreateAccount(
                admin_pb.CreateAccountRequest(account_id=acct, initial_balance_micros=10**12))
            batches = notifications_pb2_grpc.NotificationsStub(channel).SubscribeBatches(
                npb.SubscribeRequest(account_ids=[acct]))
            await asyncio.wait_for(batches.initial_metadata(), READ_TIMEOUT_S)

            await sms(charging, acct, "alone")
            started = time.monotonic()
            [alone] = (await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)).events
            assert alone.session_id == "alone"
            assert time.monotonic() - started >= linger_s / 2  # it waited for company

            for n in range(3):  # three events within the linger: one batch
                await sms(charging, acct, f"together{n}")
            together = await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)
            assert [e.session_id for e in together.events] == [f"together{n}" for n in range(3)]

            answers = [await sms(charging, acct, f"many{n}") for n in range(120)]
            assert all(a.result_code == pb.SUCCESS for a in answers)
            received: list[npb.ChargeEvent] = []
            while len(received) < 120:  # the queue of 40 never overflowed: ended else
                batch = await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)
                received += batch.events
            assert [e.session_id for e in received] == [f"many{n}" for n in range(120)]
            resumed = notifications_pb2_grpc.NotificationsStub(channel).SubscribeBatches(
                npb.SubscribeRequest(account_ids=[acct], cursor=batch.cursor))
            await sms(charging, acct, "after")
            [after] = (await asyncio.wait_for(resumed.read(), READ_TIMEOUT_S)).events
            assert after.session_id == "after"  # the cursor of the last batch: nothing twice
            batches.cancel()
            resumed.cancel()
    finally:
        await stop_server(running, grace_s=1.0)


async def test_a_subscriber_chooses_its_own_batch_linger(
        charging, notifications, make_account):  # type: ignore[no-untyped-def]
    # the shared server lingers not at all; this subscriber asks for 800 ms
    acct = await make_account(balance_micros=10**9)
    batches = notifications.SubscribeBatches(
        npb.SubscribeRequest(account_ids=[acct], batch_linger_ms=800))
    await asyncio.wait_for(batches.initial_metadata(), READ_TIMEOUT_S)
    started = time.monotonic()
    for n in range(3):
        await sms(charging, acct, f"together{n}")
    together = await asyncio.wait_for(batches.read(), READ_TIMEOUT_S)
    assert [e.session_id for e in together.events] == [f"together{n}" for n in range(3)]
    assert time.monotonic() - started >= 0.4  # the first event waited for the others
    batches.cancel()


@pytest.mark.parametrize(("method", "linger_ms", "reason"), [
    ("SubscribeBatches", 1001, "at most 1000"),
    ("Subscribe", 10, "only for SubscribeBatches"),
    ("Subscribe", 0, "only for SubscribeBatches"),
])
async def test_a_batch_linger_out_of_bounds_or_on_subscribe_is_refused(
        notifications, make_account, method, linger_ms, reason):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10**9)
    call = getattr(notifications, method)(
        npb.SubscribeRequest(account_ids=[acct], batch_linger_ms=linger_ms))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")
