"""Many sessions on one account at once never take it past its credit limit."""

from __future__ import annotations

import asyncio

from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_WEB, block, ccr, granted


async def test_hundred_concurrent_sessions_never_exceed_the_credit_limit(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    balance, credit_limit = 1_000_000, 500_000
    acct = await make_account(balance_micros=balance, credit_limit_micros=credit_limit)
    sessions = [f"{acct};{n}" for n in range(100)]

    initials = await asyncio.gather(*(
        charging.Initial(ccr(sid, acct, 0, block(RG_WEB, requested=102_400)))
        for sid in sessions))
    grants = [granted(a, RG_WEB) for a in initials]
    # 1_500 KiB can be paid in all; each session asked for 100 KiB
    assert sum(grants) == 1_500 * 1_024
    assert sum(1 for a in initials if a.result_code == pb.CREDIT_LIMIT_REACHED) == 85
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.available_micros == 0 and state.reserved_micros == 1_500_000

    # every session reports its grant used and asks again, all at once
    updates = await asyncio.gather(*(
        charging.Update(ccr(sid, acct, 1, block(RG_WEB, requested=102_400, used=g)))
        for sid, g in zip(sessions, grants, strict=True)))
    assert all(granted(a, RG_WEB) == 0 for a in updates)
    await asyncio.gather(*(charging.Terminate(ccr(sid, acct, 2)) for sid in sessions))
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.balance_micros == -credit_limit
    assert state.reserved_micros == 0
