"""Bad requests get a clear error naming the field, and nothing is charged for them."""

from __future__ import annotations

import pytest
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_WEB, block, ccr

LIMIT = 2**53


def _bad_requests(acct: str) -> list[tuple[str, pb.CreditControlRequest, int, str]]:
    too_many = ccr(f"{acct};many", acct, 0,
                   *(pb.RatingGroupRequest(rating_group=rg) for rg in range(65)))
    unknown_reason = ccr(f"{acct};r", acct, 0, block(RG_WEB, requested=1))
    unknown_reason.rating_groups[0].reporting_reason = 77  # type: ignore[assignment]
    return [
        ("Initial", ccr("", acct, 0, block(RG_WEB, requested=1)), pb.MISSING_AVP, "session_id"),
        ("Initial", ccr("x" * 257, acct, 0, block(RG_WEB, requested=1)), pb.INVALID_AVP_VALUE,
         "session_id"),
        ("Initial", ccr("s\n1", acct, 0, block(RG_WEB, requested=1)), pb.INVALID_AVP_VALUE,
         "session_id"),
        ("Initial", ccr(f"{acct};a", "", 0, block(RG_WEB, requested=1)), pb.MISSING_AVP,
         "account_id"),
        ("Initial", ccr(f"{acct};a", "a{b}", 0, block(RG_WEB, requested=1)),
         pb.INVALID_AVP_VALUE, "account_id"),
        ("Initial", ccr(f"{acct};n", acct, 3, block(RG_WEB, requested=1)), pb.INVALID_AVP_VALUE,
         "request_number"),
        ("Update", ccr(f"{acct};n", acct, 0, block(RG_WEB, used=1)), pb.INVALID_AVP_VALUE,
         "request_number"),
        ("Initial", ccr(f"{acct};big", acct, 0, block(RG_WEB, requested=LIMIT)),
         pb.INVALID_AVP_VALUE, "rating_groups[0].requested.total_octets"),
        ("Initial", ccr(f"{acct};dup", acct, 0, block(RG_WEB, requested=1),
                        block(RG_WEB, requested=2)), pb.INVALID_AVP_VALUE, "appears twice"),
        ("Initial", too_many, pb.INVALID_AVP_VALUE, "rating_groups"),
        ("Initial", unknown_reason, pb.INVALID_AVP_VALUE, "reporting_reason"),
    ]


async def test_bad_credit_control_requests_are_refused_naming_the_field(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    for method, request, code, field in _bad_requests(acct):
        answer = await getattr(charging, method)(request)
        assert answer.result_code == code, (field, answer)
        assert field in answer.error_message, (field, answer.error_message)
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert (state.balance_micros, state.reserved_micros, state.open_sessions) == (1_000_000, 0, 0)


async def test_bad_event_requests_are_refused(charging, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    no_action = pb.EventRequest(session_id=f"{acct};e", account_id=acct,
                                rating_groups=[block(RG_WEB, requested=1)])
    answer = await charging.Event(no_action)
    assert answer.result_code == pb.MISSING_AVP and "action" in answer.error_message
    no_units = pb.EventRequest(session_id=f"{acct};e", account_id=acct, action=pb.DIRECT_DEBIT,
                               rating_groups=[block(RG_WEB)])
    answer = await charging.Event(no_units)
    assert answer.result_code == pb.MISSING_AVP and "requested" in answer.error_message
    unknown_action = pb.EventRequest(session_id=f"{acct};e", account_id=acct, action=42,  # type: ignore[arg-type]
                                     rating_groups=[block(RG_WEB, requested=1)])
    answer = await charging.Event(unknown_action)
    assert answer.result_code == pb.INVALID_AVP_VALUE and "action" in answer.error_message


@pytest.mark.parametrize("amount", [0, -5, 2**53])
async def test_bad_top_ups_are_refused(admin, make_account, amount):  # type: ignore[no-untyped-def]
    import grpc

    acct = await make_account(balance_micros=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=amount,
                                                top_up_id="t1"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "amount_micros" in (refused.value.details() or "")


async def test_top_up_is_applied_once_per_id(admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=10)
    for _ in range(3):
        state = await admin.TopUp(admin_pb.TopUpRequest(account_id=acct, amount_micros=500,
                                                        top_up_id="voucher-1"))
    assert state.balance_micros == 510 and state.topped_up_micros == 500
