"""The request path in the rating kernels: the checks of a request and the answer written
from the charging script's answer string straight into protobuf wire bytes.

The generated classes are the reference for the wire bytes: the answer built field by field
as a message from the same script answer (`reference_*` below) must be what the kernels
wrote, on Hypothesis-generated answers, for the compiled kernels and for their pure twin.
The twin is the reference for the checks: both give the same refusal on generated
requests. And the switch is real: a server on each implementation answers through it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from creditline.api.app import CHARGING, RunningServer
from creditline.api.handlers import add_service
from creditline.api.messages import UNIT_CODES, block_plan, request_rules
from creditline.api.service import ChargingService
from creditline.charging.kernels import (
    PURE_ENV,
    Kernels,
    compiled_kernels,
    pure_kernels,
    require_kernels,
)
from creditline.charging.rating import (
    BandedRater,
    IncrementRater,
    Plan,
    Rater,
    RateTable,
    Tariff,
    UnitKind,
    load_plan,
    parse_plan,
)
from creditline.observability.telemetry import TracedRater
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.contract import MAX_SAFE_INTEGER, EventBlockAnswer, SessionBlockAnswer
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from tests.messages import RG_SMS, RG_VOICE, RG_WEB, block, ccr

COMPILED, PURE = compiled_kernels(), pure_kernels()
BOTH = [COMPILED, PURE]
UNIT_FIELDS = {"t": "time_s", "v": "total_octets", "s": "service_specific_units"}
PLAN_TIMES = (1800, 300, 20)   # validity_time_s, quota_holding_time_s, threshold percent
FILTERS = {7: ("http://top.up/", ("f1", "")), 8: ("", ())}  # rating group -> tariff's FUI


def final_unit_of(rating_group: int, service_id: int | None) -> tuple[str, Sequence[str]]:
    return FILTERS.get(rating_group, ("", ()))


# ---------------------------------------------------------------- the reference


def _split(answer: str) -> tuple[int, list[list[str]], str]:
    parts = answer.split(";")
    if len(parts) > 1 and parts[1].startswith("!"):
        return int(parts[0]), [], parts[1][1:]
    return int(parts[0]), [p.split(",") for p in parts[1:]], ""


def _block_id(block_id: str, into: pb.RatingGroupAnswer | pb.EventRatingGroupAnswer) -> None:
    rating_group, _, service_id = block_id.partition(".")
    into.rating_group = int(rating_group)
    if service_id:
        into.service_id = int(service_id)


def reference_credit_control(answer: str, session_id: str, request_number: int
                             ) -> pb.CreditControlAnswer:
    """The answer as the generated classes build it (the server did this before)."""
    code, fields, reason = _split(answer)
    result = pb.CreditControlAnswer(
        session_id=session_id, request_number=request_number, result_code=code,  # type: ignore[arg-type]
        error_message=reason, failure_handling=pb.FAILURE_HANDLING_RETRY_AND_TERMINATE)
    validity_s, holding_s, percent = PLAN_TIMES
    for rg, block_code, unit, granted, charged, final, expires_s in fields:
        item = result.rating_groups.add(result_code=int(block_code),  # type: ignore[arg-type]
                                        charged_micros=int(charged))
        _block_id(rg, item)
        if unit not in UNIT_FIELDS or int(block_code) != pb.SUCCESS or int(granted) == 0:
            continue
        setattr(item.granted, UNIT_FIELDS[unit], int(granted))
        item.validity_time_s = min(validity_s, int(expires_s) or validity_s)
        item.quota_holding_time_s = holding_s
        if unit == "v":
            item.volume_quota_threshold_octets = int(granted) * percent // 100
        elif unit == "t":
            item.time_quota_threshold_s = int(granted) * percent // 100
        if final != "0":
            item.final_unit_indication.action = int(final)  # type: ignore[assignment]
            redirect, filters = final_unit_of(item.rating_group, None)
            item.final_unit_indication.redirect_address = redirect
            item.final_unit_indication.restriction_filter_ids.extend(filters)
    return result


def reference_event(answer: str, session_id: str, request_number: int) -> pb.EventAnswer:
    code, fields, reason = _split(answer)
    result = pb.EventAnswer(session_id=session_id, request_number=request_number,
                            result_code=code, error_message=reason)  # type: ignore[arg-type]
    if fields and fields[-1][0].startswith("B"):
        result.balance_micros = int(fields[-1][0][1:])
        result.sufficient = fields[-1][1] == "1"
        fields = fields[:-1]
    for rg, block_code, unit, units, amount, from_buckets in fields:
        item = result.rating_groups.add(
            result_code=int(block_code), amount_micros=int(amount),  # type: ignore[arg-type]
            units_from_buckets=int(from_buckets))
        _block_id(rg, item)
        if unit in UNIT_FIELDS:
            setattr(item.units, UNIT_FIELDS[unit], int(units))
    return result


# ---------------------------------------------------------------- generated answers

codes = st.sampled_from([2001, 4010, 4011, 4012, 5002, 5004, 5012, 5030, 5031])
uint32 = st.integers(0, 2**32 - 1)
amounts = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
ids = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
reasons = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=";"),
                  max_size=60)


@st.composite
def block_ids(draw: st.DrawFn) -> str:
    group = draw(st.one_of(st.integers(0, 9), uint32))
    service = draw(st.none() | uint32)
    return str(group) if service is None else f"{group}.{service}"


@st.composite
def session_blocks(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(["t", "v", "s", "-"]))
    # a time threshold is a uint32: grants of time stay below it
    granted = draw(st.integers(0, 2**32 - 1 if unit == "t" else MAX_SAFE_INTEGER))
    fields = (draw(block_ids()), draw(codes | st.just(2001)), unit, granted,
              draw(amounts), draw(st.integers(0, 3)), draw(st.integers(0, 10**6)))
    return ",".join(str(f) for f in fields)


@st.composite
def session_answers(draw: st.DrawFn) -> str:
    code = draw(codes)
    if draw(st.booleans()):
        return f"{code};!{draw(reasons)}"
    return ";".join([str(code), *draw(st.lists(session_blocks(), max_size=4))])


@st.composite
def event_answers(draw: st.DrawFn) -> str:
    code = draw(codes)
    if draw(st.booleans()):
        return f"{code};!{draw(reasons)}"
    blocks = [",".join(str(f) for f in (
        draw(block_ids()), draw(codes), draw(st.sampled_from(["t", "v", "s", "-"])),
        draw(st.integers(0, MAX_SAFE_INTEGER)), draw(amounts),
        draw(st.integers(0, MAX_SAFE_INTEGER))))
        for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):
        blocks.append(f"B{draw(amounts)},{draw(st.sampled_from('01'))}")
    return ";".join([str(code), *blocks])


@given(session_answers(), ids, uint32)
def test_credit_control_answers_are_the_generated_classes_bytes(
        answer: str, session_id: str, request_number: int) -> None:
    reference = reference_credit_control(answer, session_id, request_number)
    for kernels in BOTH:
        written = kernels.module.encode_credit_control(
            answer, session_id, request_number, PLAN_TIMES, final_unit_of)
        assert pb.CreditControlAnswer.FromString(written) == reference, kernels.implementation
        assert written == reference.SerializeToString(deterministic=True)


@given(event_answers(), ids, uint32)
def test_event_answers_are_the_generated_classes_bytes(
        answer: str, session_id: str, request_number: int) -> None:
    reference = reference_event(answer, session_id, request_number)
    for kernels in BOTH:
        written = kernels.module.encode_event(answer, session_id, request_number)
        assert pb.EventAnswer.FromString(written) == reference, kernels.implementation
        assert written == reference.SerializeToString(deterministic=True)


@given(ids, uint32, codes, reasons, st.integers(0, 2**64 - 1))
def test_refusals_and_stream_answers_are_the_generated_classes_bytes(
        session_id: str, request_number: int, code: int, message: str,
        correlation_id: int) -> None:
    credit_control = pb.CreditControlAnswer(
        session_id=session_id, request_number=request_number, result_code=code,  # type: ignore[arg-type]
        error_message=message)
    if code == pb.UNABLE_TO_COMPLY:
        credit_control.failure_handling = pb.FAILURE_HANDLING_RETRY_AND_TERMINATE
    event = pb.EventAnswer(session_id=session_id, request_number=request_number,
                           result_code=code, error_message=message)  # type: ignore[arg-type]
    for kernels in BOTH:
        module = kernels.module
        refused = module.encode_credit_control_refusal(session_id, request_number, code, message)
        assert refused == credit_control.SerializeToString(deterministic=True)
        event_refused = module.encode_event_refusal(session_id, request_number, code, message)
        assert event_refused == event.SerializeToString(deterministic=True)
        streamed = pb.StreamAnswer.FromString(module.encode_stream_answer(
            correlation_id, 2, refused))
        assert streamed == pb.StreamAnswer(correlation_id=correlation_id,
                                           credit_control=credit_control)
        empty = pb.StreamAnswer.FromString(module.encode_stream_answer(correlation_id, 3, b""))
        assert empty.WhichOneof("answer") == "event"


# ---------------------------------------------------------------- generated requests

RULES = request_rules(Settings(max_event_age_s=3600))
NOW_MS = 1_800_000_000_000
big = st.one_of(st.integers(0, 2**64 - 1), st.integers(MAX_SAFE_INTEGER - 2, MAX_SAFE_INTEGER + 2))
units = st.builds(pb.Units, time_s=big, total_octets=big, uplink_octets=big,
                  downlink_octets=big, service_specific_units=big)
blocks = st.builds(
    pb.RatingGroupRequest, rating_group=st.integers(0, 3), service_id=st.none() | st.just(1),
    requested=st.none() | units, used=st.none() | units,
    reporting_reason=st.integers(-1, 11))  # type: ignore[arg-type]
text = st.one_of(st.sampled_from(["", "a", "s-1", "a b", "x" * 300, "\x07", "é", "{x}"]), ids)
times = st.one_of(st.just(0), st.integers(NOW_MS - 4_000_000, NOW_MS + 4_000_000),
                  st.integers(-(2**63), 2**63 - 1))


@given(st.builds(pb.CreditControlRequest, session_id=text, account_id=text,
                 request_number=st.integers(0, 2), event_time_unix_ms=times,
                 rating_groups=st.lists(blocks, max_size=4)), st.booleans())
def test_credit_control_checks_agree(request: pb.CreditControlRequest, initial: bool) -> None:
    assert (COMPILED.module.validate_credit_control(request, initial, RULES, NOW_MS)
            == PURE.module.validate_credit_control(request, initial, RULES, NOW_MS))


@given(st.builds(pb.EventRequest, session_id=text, account_id=text, event_time_unix_ms=times,
                 action=st.integers(-1, 6), refund_of_session_id=text,  # type: ignore[arg-type]
                 rating_groups=st.lists(blocks, max_size=4)))
def test_event_checks_agree(request: pb.EventRequest) -> None:
    assert (COMPILED.module.validate_event(request, RULES, NOW_MS)
            == PURE.module.validate_event(request, RULES, NOW_MS))


# ---------------------------------------------------------------- the blocks' script arguments


def reference_units(units: pb.Units, kind: UnitKind) -> int:
    if kind is UnitKind.VOLUME and not units.HasField("total_octets"):
        return units.uplink_octets + units.downlink_octets
    value: int = getattr(units, UNIT_FIELDS[UNIT_CODES[kind]])
    return value


def reference_script_blocks(blocks: Sequence[pb.RatingGroupRequest], plan: Plan, rater: Rater,
                            event_time_ms: int, default_grant: bool) -> list[int | str]:
    """The blocks' arguments as the server made them in Python before (rating.py's tariff
    choice and rate tables, block by block)."""
    args: list[int | str] = [len(blocks)]
    period = ""
    for item in blocks:
        service_id = item.service_id if item.HasField("service_id") else None
        tariff = plan.tariff_for(item.rating_group, service_id, event_time_ms)
        block_id = str(item.rating_group) if service_id is None else (
            f"{item.rating_group}.{service_id}")
        tariff_id = f"{plan.name}/{block_id}"
        if tariff is None:
            args += [block_id, item.rating_group, tariff_id, "none", 0, 0, "-", 0]
            continue
        unit = UNIT_CODES[tariff.unit_kind]
        final_action = pb.FinalUnitAction.Value(tariff.final_unit_action.name)
        requested = -1
        if item.HasField("requested"):
            requested = reference_units(item.requested, tariff.unit_kind)
            if requested == 0 and default_grant and not tariff.free:
                requested = tariff.default_grant_units
        used = reference_units(item.used, tariff.unit_kind)
        if tariff.free:
            args += [block_id, item.rating_group, tariff_id, "free", max(requested, 0), used,
                     unit, final_action]
            continue
        if tariff.tiers and not period:
            period = plan.billing_period(event_time_ms)
        lookback_s = used if tariff.unit_kind is UnitKind.TIME else 0
        table = rater.rate_table(tariff, event_time_ms, lookback_s, period)
        args += [block_id, item.rating_group, tariff_id, "ok", requested, used, unit,
                 final_action, *table.script_args]
    return args


GROUPS, SERVICES = (1, 2, 3), (7, 8)
# around the instants the generated versions start at
VERSION_DAYS = [dt.date(2027, 1, d) for d in (1, 10, 20)]
BLOCK_TIMES_MS = st.integers(1_797_000_000_000, 1_801_000_000_000)  # 2026-12-11 to 01-26
prices = st.integers(0, 10**6)


@st.composite
def tariff_tables(draw: st.DrawFn) -> dict[str, object]:
    first = draw(st.integers(1, 120))
    following = draw(st.integers(1, 60))
    table: dict[str, object] = {
        "rating_group": draw(st.sampled_from(GROUPS)),
        "unit": draw(st.sampled_from([k.value for k in UnitKind])),
        "connect_fee_micros": draw(prices), "first_increment_units": first,
        "first_increment_price_micros": draw(prices), "next_increment_units": following,
        "next_increment_price_micros": draw(prices),
        "default_grant_units": draw(st.integers(0, 1000)),
        "final_unit_action": draw(st.sampled_from(["terminate", "restrict_access"])),
    }
    if draw(st.integers(0, 2)) == 0:
        table["service_id"] = draw(st.sampled_from(SERVICES))
    if draw(st.integers(0, 5)) == 0:
        table["free"] = True
    if draw(st.integers(0, 2)) == 0:
        table["active_from"] = draw(st.sampled_from(VERSION_DAYS))
    if draw(st.booleans()):
        start = draw(st.integers(0, 22))
        table["band"] = [{"name": "peak", "start": f"{start:02d}:00",
                          "end": f"{draw(st.integers(start + 1, 24)):02d}:00",
                          "next_increment_price_micros": draw(prices)}]
    if draw(st.integers(0, 3)) == 0:
        table["tier"] = [{"from_units": first + following * draw(st.integers(0, 50)),
                          "next_increment_price_micros": draw(prices)}]
    return table


@st.composite
def generated_plans(draw: st.DrawFn) -> Plan:
    tables = draw(st.lists(tariff_tables(), min_size=2, max_size=10))
    # versions of one tariff differ by their activation date
    tables = list({(t["rating_group"], t.get("service_id"), t.get("active_from")): t
                   for t in tables}.values())
    return parse_plan({"plan": {"name": draw(st.sampled_from(["p", "default"])),
                                "time_zone": draw(st.sampled_from(["UTC", "Europe/Paris"]))},
                       "tariff": tables}, source="generated")


some = st.one_of(st.none(), st.integers(0, 10**6), st.integers(1, 10**5))
request_units = st.builds(pb.Units, time_s=some, total_octets=some, uplink_octets=some,
                          downlink_octets=some, service_specific_units=some)
generated_blocks = st.builds(
    pb.RatingGroupRequest, rating_group=st.sampled_from((*GROUPS, *GROUPS, 0)),
    service_id=st.none() | st.sampled_from((*SERVICES, 9)),
    requested=st.none() | request_units, used=request_units)


def _unique(blocks: list[pb.RatingGroupRequest]) -> list[pb.RatingGroupRequest]:
    # the checks refuse a (rating group, service id) twice
    return list({(b.rating_group, b.service_id if b.HasField("service_id") else None): b
                 for b in blocks}.values())


@settings(max_examples=300)
@given(generated_plans(), st.lists(generated_blocks, max_size=5).map(_unique), BLOCK_TIMES_MS,
       st.booleans())
def test_block_arguments_are_the_reference_on_both_kernels(
        plan: Plan, request_blocks: list[pb.RatingGroupRequest], event_time_ms: int,
        default_grant: bool) -> None:
    # (the traced rater: the same tables, some with a span around their making)
    traced = TracedRater(BandedRater(), TracerProvider().get_tracer("test"))
    for rater in (BandedRater(), IncrementRater(), traced):
        reference = reference_script_blocks(request_blocks, plan, rater, event_time_ms,
                                            default_grant)
        for kernels in BOTH:
            made = block_plan(kernels, plan, rater).script_blocks(
                request_blocks, event_time_ms, default_grant)
            assert made == reference, (kernels.implementation, type(rater).__name__)
            assert [type(a) for a in made] == [type(a) for a in reference]


@pytest.mark.parametrize("kernels", BOTH, ids=lambda k: k.implementation)
def test_a_block_plan_refuses_what_it_cannot_send(kernels: Kernels) -> None:
    module = kernels.module
    blocks_of = module.BlockPlan("p", lambda *_: (), lambda _: "")
    blocks_of.add_version(1, -1, 100, module.FIXED, "t", 1, 0, False, ("F", 0, 0), None)
    refused = {
        "active_from_ms: versions are added in ascending order":
            (1, -1, 99, module.FIXED, "t", 1, 0, False, ("F",), None),
        "how: FREE, FIXED or RATED, got 7": (1, -1, 200, 7, "t", 1, 0, False, None, None),
        "unit_code: one of t, v, s, got 'x'":
            (1, -1, 200, module.FREE, "x", 1, 0, False, None, None),
        "table_args: given with FIXED, and only then":
            (1, -1, 200, module.RATED, "t", 1, 0, False, ("F",), None),
        "rating_group, service_id: must be uint32 (service_id -1: none)":
            (2**32, -1, 200, module.FREE, "t", 1, 0, False, None, None),
    }
    for message, version in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            blocks_of.add_version(*version)
    assert blocks_of.script_blocks([block(1), block(1, service_id=3)], 99, True) == [
        2, "1", 1, "p/1", "none", 0, 0, "-", 0, "1.3", 1, "p/1.3", "none", 0, 0, "-", 0]


@pytest.mark.parametrize("kernels", BOTH, ids=lambda k: k.implementation)
def test_a_tariff_without_versions_is_in_force_at_any_time(kernels: Kernels) -> None:
    # a plan made in code may hold `tariffs` alone: Plan.tariff_for then ignores active_from
    later = Tariff(RG_WEB, None, UnitKind.VOLUME, next_increment_price_micros=3,
                   active_from_unix_ms=NOW_MS)
    plan = Plan("p", 1800, 300, 20, tariffs={(RG_WEB, None): later})
    request = [block(RG_WEB, requested=10), block(RG_WEB, service_id=2)]
    made = block_plan(kernels, plan, BandedRater()).script_blocks(request, 0, True)
    assert made == reference_script_blocks(request, plan, BandedRater(), 0, True)
    assert made[4] == "ok" and made.count("ok") == 2  # both blocks rated


class CountingRater(BandedRater):
    """The full rater, counting the tables it is asked for per request."""

    def __init__(self) -> None:
        super().__init__()
        self.tables_asked = 0

    def rate_table(self, tariff: Tariff, event_time_unix_ms: int, lookback_s: int,
                   period: str) -> RateTable:
        self.tables_asked += 1
        return super().rate_table(tariff, event_time_unix_ms, lookback_s, period)


@pytest.mark.parametrize("kernels", BOTH, ids=lambda k: k.implementation)
def test_the_default_plans_blocks_ask_the_rater_nothing_per_request(kernels: Kernels) -> None:
    # every default tariff is fixed: its arguments were made at start
    plan, rater = load_plan(DEFAULT_PLAN_PATH), CountingRater()
    blocks_of = block_plan(kernels, plan, rater)
    asked_at_start = rater.tables_asked
    request = [block(RG_WEB, requested=1024, used=10), block(RG_VOICE, requested=0, used=7),
               block(RG_SMS, requested=1), block(RG_WEB, service_id=4)]
    args = blocks_of.script_blocks(request, NOW_MS, default_grant=True)
    assert rater.tables_asked == asked_at_start
    assert args == reference_script_blocks(request, plan, BandedRater(), NOW_MS, True)
    banded = block_plan(kernels, load_plan(DEFAULT_PLAN_PATH.parent / "bands-and-tiers.toml"),
                        rater)
    asked_at_start = rater.tables_asked
    banded.script_blocks([block(RG_WEB, requested=1)], NOW_MS, default_grant=True)
    assert rater.tables_asked == asked_at_start + 1  # a table with bands: the rater's


def test_the_kernels_read_the_answer_fields_in_the_contracts_order() -> None:
    # the script writes its block fields in the order contract.py names them
    session = SessionBlockAnswer(rg="7.3", code="2001", unit="v", granted="1000",
                                 charged="42", final="2", expires_in_s="60")
    event = EventBlockAnswer(rg="8", code="2001", unit="s", units="3", amount="150",
                             from_buckets="1")
    for kernels in BOTH:
        answer = pb.CreditControlAnswer.FromString(kernels.module.encode_credit_control(
            "2001;" + ",".join(session), "s", 1, PLAN_TIMES, final_unit_of))
        item = answer.rating_groups[0]
        assert (item.rating_group, item.service_id, item.result_code, item.granted.total_octets,
                item.charged_micros, item.final_unit_indication.action,
                item.validity_time_s) == (7, 3, pb.SUCCESS, 1000, 42, pb.REDIRECT, 60)
        event_answer = pb.EventAnswer.FromString(kernels.module.encode_event(
            "2001;" + ",".join(event) + ";B99,1", "e", 0))
        block_answer = event_answer.rating_groups[0]
        assert (block_answer.rating_group, block_answer.units.service_specific_units,
                block_answer.amount_micros, block_answer.units_from_buckets,
                event_answer.balance_micros, event_answer.sufficient) == (8, 3, 150, 1, 99, True)


def test_the_kernels_know_the_protocols_values() -> None:
    # what the kernels hold of the proto: a value added there must be added here
    for kernels in BOTH:
        module = kernels.module
        assert (module.SUCCESS, module.INVALID_AVP_VALUE, module.MISSING_AVP,  # type: ignore[attr-defined]
                module.UNABLE_TO_COMPLY, module.REFUND) == (  # type: ignore[attr-defined]
            pb.SUCCESS, pb.INVALID_AVP_VALUE, pb.MISSING_AVP, pb.UNABLE_TO_COMPLY, pb.REFUND)
        assert max(pb.RequestedAction.values()) == module.EVENT_ACTION_MAX  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the switch


ENVIRONMENT_KERNELS = "pure" if os.environ.get(PURE_ENV) == "1" else "compiled"


@pytest.fixture(params=["compiled", "pure", "as the environment says"])
async def service_on(request: pytest.FixtureRequest, server: RunningServer, settings: Settings
                     ) -> AsyncIterator[tuple[ChargingService, charging_pb2_grpc.ChargingStub]]:
    """A Charging service on the given kernels, or built as `creditline serve` builds it
    (no kernels given: the environment's), served by a grpc server of its own on the test
    server's store and plan."""
    kernels = {"compiled": COMPILED, "pure": PURE}.get(request.param)
    service = ChargingService(server.store, server.catalogue, BandedRater(), settings,
                              kernels=kernels)
    if kernels is None:
        # the suite runs twice (README): on the compiled kernels, then with
        # CREDITLINE_PURE_RATING=1 on the twin
        assert service.path.kernels.implementation == ENVIRONMENT_KERNELS
        assert service.path.kernels.module.__name__ == (  # type: ignore[attr-defined]
            f"creditline.native.{'kernels_py' if ENVIRONMENT_KERNELS == 'pure' else 'kernels'}")
    grpc_server = grpc.aio.server()
    add_service(grpc_server, service, CHARGING)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service, charging_pb2_grpc.ChargingStub(channel)
    await grpc_server.stop(None)


async def test_each_implementation_answers_the_same_session(
        service_on: tuple[ChargingService, charging_pb2_grpc.ChargingStub],
        make_account, checked_books: object) -> None:  # type: ignore[no-untyped-def]
    service, stub = service_on
    new_account_id = await make_account(5_000_000)
    session = f"switch-{service.path.kernels.implementation}-{new_account_id}"
    opened = await stub.Initial(ccr(session, new_account_id, 0, block(RG_VOICE, requested=60),
                                    block(RG_WEB, requested=4096)))
    assert opened.result_code == pb.SUCCESS
    assert [b.granted for b in opened.rating_groups] == [pb.Units(time_s=60),
                                                          pb.Units(total_octets=4096)]
    refused = await stub.Update(ccr(session, new_account_id, 0))
    assert (refused.result_code, refused.error_message) == (
        pb.INVALID_AVP_VALUE, "request_number: must be above 0 after Initial")
    closed = await stub.Terminate(ccr(session, new_account_id, 1, block(RG_VOICE, used=60),
                                      block(RG_WEB, used=1024), block(RG_SMS, used=1)))
    assert [b.charged_micros for b in closed.rating_groups] == [700_000, 1_000, 50_000]
    assert service.path.answers_written == 3  # every answer was the chosen kernels' work


def test_the_server_runs_on_the_kernels_the_environment_names() -> None:
    # what `creditline serve` checks and logs at start ("rating kernels: ...")
    assert require_kernels().implementation == ENVIRONMENT_KERNELS
