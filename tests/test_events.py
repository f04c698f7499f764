"""Event charging: direct debit, refund, balance check, price enquiry."""

from __future__ import annotations

from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_SMS, RG_VOICE, block


def event(sid: str, acct: str, action: int, rating_group: int, amount: int) -> pb.EventRequest:
    return pb.EventRequest(session_id=sid, account_id=acct, action=action,
                           rating_groups=[block(rating_group, requested=amount)])


async def test_direct_debit_and_refund(charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    debit = event(f"{acct};sms-1", acct, pb.DIRECT_DEBIT, RG_SMS, 3)
    answer = await charging.Event(debit)
    assert answer.result_code == pb.SUCCESS
    assert answer.rating_groups[0].amount_micros == 150_000
    assert answer.balance_micros == 850_000
    assert await charging.Event(debit) == answer  # retransmission: charged once

    refund_request = event(f"{acct};refund-1", acct, pb.REFUND, RG_SMS, 1)
    refund_request.refund_of_session_id = debit.session_id
    refund = await charging.Event(refund_request)
    assert refund.result_code == pb.SUCCESS
    assert refund.rating_groups[0].amount_micros == 50_000
    assert refund.balance_micros == 900_000
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert (state.charged_micros, state.refunded_micros) == (150_000, 50_000)


async def test_debit_beyond_the_balance_is_refused_whole(charging, admin, make_account,
                                                         checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=120_000)
    answer = await charging.Event(event(f"{acct};e", acct, pb.DIRECT_DEBIT, RG_SMS, 3))
    assert answer.result_code == pb.CREDIT_LIMIT_REACHED
    assert answer.balance_micros == 120_000
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.balance_micros == 120_000 and state.charged_micros == 0


async def test_check_balance_and_price_enquiry_change_nothing(
        charging, admin, make_account, checked_books):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=1_000_000)
    price = await charging.Event(event(f"{acct};p", acct, pb.PRICE_ENQUIRY, RG_VOICE, 61))
    assert price.rating_groups[0].amount_micros == 100_000 + 600_000 + 10_000
    check = await charging.Event(event(f"{acct};c", acct, pb.CHECK_BALANCE, RG_VOICE, 61))
    assert check.sufficient and check.balance_micros == 1_000_000
    check = await charging.Event(event(f"{acct};c2", acct, pb.CHECK_BALANCE, RG_VOICE, 100))
    assert not check.sufficient   # 100 s cost 1_100_000
    state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
    assert state.balance_micros == 1_000_000 and state.charged_micros == 0
