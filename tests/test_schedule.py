"""The price schedule: its laws (Hypothesis), and the Lua charging script agreeing with the
Python reference (rating.py) on prices and on grants."""

from __future__ import annotations

import random
from pathlib import Path

from creditline.charging.rating import PriceSchedule, Segment, load_plan, simple_schedule
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import charging_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.messages import RG_SMS, RG_VIDEO, RG_VOICE, RG_WEB, block, ccr, granted

PLAN = load_plan(Path(__file__).parent / "plan.toml")


@st.composite
def schedules(draw: st.DrawFn) -> PriceSchedule:
    segments = []
    end = 0
    for _ in range(draw(st.integers(0, 3))):
        increment = draw(st.integers(1, 100))
        end += increment * draw(st.integers(1, 20))
        segments.append(Segment(end, increment, draw(st.integers(0, 10_000))))
    segments.append(Segment(None, draw(st.integers(1, 100)), draw(st.integers(1, 10_000))))
    return PriceSchedule(draw(st.integers(0, 5_000)), tuple(segments))


@settings(max_examples=500, deadline=None)
@given(schedules(), st.integers(0, 10_000), st.integers(0, 10_000))
def test_cost_is_monotonic(schedule: PriceSchedule, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert schedule.cost(low) <= schedule.cost(high)


@settings(max_examples=500, deadline=None)
@given(schedules(), st.integers(0, 5_000), st.integers(0, 2_000_000))
def test_affordable_is_the_inverse_of_cost(schedule: PriceSchedule, start: int,
                                           amount: int) -> None:
    wanted = 10**12
    units = schedule.affordable_units(start, amount, wanted)
    base = schedule.cost(start)
    assert schedule.cost(start + units) - base <= amount
    # one unit more would start an increment the amount cannot pay
    assert schedule.cost(start + units + 1) - base > amount


async def test_lua_prices_match_the_python_reference(charging, make_account):  # type: ignore[no-untyped-def]
    acct = await make_account(balance_micros=0)
    rng = random.Random(20261129)
    for number in range(300):
        rating_group = rng.choice([RG_WEB, RG_VIDEO, RG_VOICE, RG_SMS])
        units = rng.choice([0, 1, 59, 60, 61, 1023, 1024, 1025, rng.randrange(1, 10**9)])
        answer = await charging.Event(pb.EventRequest(
            session_id=f"{acct};p{number}", account_id=acct, action=pb.PRICE_ENQUIRY,
            rating_groups=[block(rating_group, requested=units)]))
        tariff = PLAN.tariff_for(rating_group, None)
        assert tariff is not None
        assert answer.rating_groups[0].amount_micros == simple_schedule(tariff).cost(units), (
            rating_group, units)


async def test_lua_grants_match_the_python_inverse(charging, admin, make_account,
                                                   checked_books):  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    for number in range(100):
        rating_group = rng.choice([RG_WEB, RG_VIDEO, RG_VOICE])
        balance = rng.choice([0, 99_999, 100_000, 700_000, rng.randrange(0, 50_000_000)])
        wanted = rng.randrange(1, 20_000_000)
        acct = await make_account(balance_micros=balance)
        answer = await charging.Initial(ccr(f"{acct};{number}", acct, 0,
                                            block(rating_group, requested=wanted)))
        tariff = PLAN.tariff_for(rating_group, None)
        assert tariff is not None
        schedule = simple_schedule(tariff)
        expected = schedule.affordable_units(0, balance, wanted)
        assert granted(answer, rating_group) == expected, (rating_group, balance, wanted)
        state = await admin.GetAccount(admin_pb.GetAccountRequest(account_id=acct))
        assert state.reserved_micros == schedule.cost(expected) <= balance
