"""Stale sessions: closed by supervision after twice their validity time without a request;
usage so far stays charged, the rest is released, a CDR and a notification say why."""

from __future__ import annotations

import asyncio
import time

from creditline.events.hub import decode_entry
from creditline.store.supervision import Supervisor
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_VOICE, RG_WEB, block, ccr
from tests.waiting import until


async def test_stale_session_is_closed_once_by_supervision(
        server, charging, admin, make_account, redis, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10_000_000)
    sid = f"{acct};stale"
    await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=10_240),
                               block(RG_VOICE, requested=300)))
    await charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=10_240, used=4_096)))
    fresh = f"{acct};fresh"
    await charging.Initial(ccr(fresh, acct, 0, block(RG_WEB, requested=1_024)))
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.reserved_micros > 0 and state.open_sessions == 2

    store = server.store
    keys = store.keys(acct)
    deadlines = f"cl:{{{keys.partition}}}:deadlines"
    # the stale session's deadline passes (2 x 1800 s validity: moved, not waited for)
    await redis.zadd(deadlines, {keys.session(sid): int(time.time() * 1000) - 1})
    closed_by_server_before = server.supervisor.closed
    sweepers = [Supervisor(store, interval_s=60, batch=10) for _ in range(3)]
    closed = await asyncio.gather(*(s.sweep_once() for s in sweepers))

    def closures() -> int:
        return sum(closed) + server.supervisor.closed - closed_by_server_before

    # the server's own sweep (every second) may have closed it while ours ran; its count
    # moves when its script's answer is read, which can come after ours
    await until(closures, timeout_s=1.0)
    # three more sweepers beside the server's own: the session is closed exactly once
    assert closures() == 1

    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.open_sessions == 1
    assert state.balance_micros == 10_000_000 - 4_000   # the usage reported stays charged
    assert state.reserved_micros == 1_000               # only the fresh session holds money
    cdrs = await redis.xrange(keys.cdrs)
    mine = [f for _, f in cdrs if f["session"] == sid]
    assert len(mine) == 1 and mine[0]["cause"] == "supervision"
    assert mine[0]["charged"] == "4000"
    ended = [e.fields for stream_id, fields in await redis.xrange(keys.events)
             for e in decode_entry(keys.partition, stream_id, fields)
             if e.fields.get("s") == sid and e.fields["t"] == "session_ended"]
    assert [e["cause"] for e in ended] == ["supervision"]
    # the client comes back too late: the session is gone
    late = await charging.Update(ccr(sid, acct, 2, block(RG_WEB, used=1)))
    assert late.result_code == pb.UNKNOWN_SESSION_ID
    await charging.Terminate(ccr(fresh, acct, 1))


async def test_a_session_with_recent_requests_is_not_closed(
        server, charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    sid = f"{acct};alive"
    await charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=1_024)))
    assert await Supervisor(server.store, interval_s=60, batch=10).sweep_once() == 0
    answer = await charging.Terminate(ccr(sid, acct, 1, block(RG_WEB, used=10)))
    assert answer.result_code == pb.SUCCESS
