"""The charging path between the gRPC messages and the charging script.

`validate_*` check a request and name the first bad field; `script_blocks` turns the
rating-group blocks into the script's arguments (tariff status, units, price schedule);
`decode_*` turn the script's answer string into the protobuf answer. No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from creditline.charging.rating import Plan, Rater, Tariff, UnitKind
from creditline.settings import Settings
from creditline.store.contract import (
    MAX_SAFE_INTEGER,
    EventAction,
    EventBlockAnswer,
    RequestKind,
    SessionBlockAnswer,
)
from creditline.v1 import charging_pb2 as pb

SUCCESS = pb.SUCCESS
INVALID = pb.INVALID_AVP_VALUE
MISSING = pb.MISSING_AVP

# Account ids become part of Redis keys inside the hash tag: no braces, no spaces.
ACCOUNT_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@+\-]+")
EVENT_ACTIONS = {
    pb.DIRECT_DEBIT: EventAction.DEBIT, pb.REFUND: EventAction.REFUND,
    pb.CHECK_BALANCE: EventAction.CHECK, pb.PRICE_ENQUIRY: EventAction.PRICE,
}
_REPORTING_REASONS = frozenset(pb.ReportingReason.values())  # values() builds a list
_UNIT_FIELD = {
    UnitKind.TIME: "time_s",
    UnitKind.VOLUME: "total_octets",
    UnitKind.SERVICE_SPECIFIC: "service_specific_units",
}
# A block's unit kind as the charging script's arguments and answers carry it ("-": the
# rating group has no tariff), so that a stored answer decodes without the request.
UNIT_CODES = {UnitKind.TIME: "t", UnitKind.VOLUME: "v", UnitKind.SERVICE_SPECIFIC: "s"}
NO_UNIT = "-"
_UNIT_OF_CODE = {code: kind for kind, code in UNIT_CODES.items()}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request refused before it reaches Redis: nothing is charged."""

    result_code: int
    message: str


def check_ids(session_id: str, account_id: str, settings: Settings) -> Refusal | None:
    refusal = check_session_id(session_id, "session_id", settings)
    if refusal:
        return refusal
    if not account_id:
        return Refusal(MISSING, "account_id: missing")
    if len(account_id.encode()) > settings.max_account_id_bytes:
        return Refusal(INVALID, f"account_id: longer than {settings.max_account_id_bytes} bytes")
    if not ACCOUNT_ID_PATTERN.fullmatch(account_id):
        return Refusal(INVALID, "account_id: only letters, digits and . _ : @ + - are allowed")
    return None


def _check_units(units: pb.Units, where: str) -> Refusal | None:
    for field in ("time_s", "total_octets", "uplink_octets", "downlink_octets",
                  "service_specific_units"):
        if getattr(units, field) > MAX_SAFE_INTEGER:
            return Refusal(INVALID, f"{where}.{field}: above the limit of {MAX_SAFE_INTEGER}")
    if units.uplink_octets + units.downlink_octets > MAX_SAFE_INTEGER:
        return Refusal(INVALID, f"{where}: uplink_octets + downlink_octets above the limit")
    return None


def _check_blocks(
    blocks: Sequence[pb.RatingGroupRequest], settings: Settings, need_units: bool
) -> Refusal | None:
    if len(blocks) > settings.max_rating_groups_per_request:
        return Refusal(INVALID, f"rating_groups: more than "
                       f"{settings.max_rating_groups_per_request} blocks")
    seen: set[tuple[int, int | None]] = set()
    for index, block in enumerate(blocks):
        where = f"rating_groups[{index}]"
        key = (block.rating_group, block.service_id if block.HasField("service_id") else None)
        if key in seen:
            return Refusal(INVALID, f"{where}.rating_group: {block.rating_group} appears twice")
        seen.add(key)
        if block.reporting_reason not in _REPORTING_REASONS:
            return Refusal(INVALID, f"{where}.reporting_reason: unknown value "
                           f"{block.reporting_reason}")
        if need_units and not block.HasField("requested"):
            return Refusal(MISSING, f"{where}.requested: missing")
        for name in ("requested", "used"):
            refusal = _check_units(getattr(block, name), f"{where}.{name}")
            if refusal:
                return refusal
    return None


def check_event_time(event_time_unix_ms: int, now_ms: int, settings: Settings
                     ) -> Refusal | None:
    """0 means now; anything else must lie in the accepted window around the clock."""
    if event_time_unix_ms == 0:
        return None
    earliest = now_ms - settings.max_event_age_s * 1000
    latest = now_ms + settings.max_event_ahead_s * 1000
    if not earliest <= event_time_unix_ms <= latest:
        return Refusal(INVALID, f"event_time_unix_ms: {event_time_unix_ms} is outside the "
                       f"accepted window: at most max_event_age_s ({settings.max_event_age_s} "
                       f"s) before the server's clock ({now_ms}) and max_event_ahead_s "
                       f"({settings.max_event_ahead_s} s) after it; 0 means now")
    return None


def validate_credit_control(
    request: pb.CreditControlRequest, kind: RequestKind, settings: Settings, now_ms: int
) -> Refusal | None:
    refusal = (check_ids(request.session_id, request.account_id, settings)
               or check_event_time(request.event_time_unix_ms, now_ms, settings))
    if refusal:
        return refusal
    if kind is RequestKind.INITIAL and request.request_number != 0:
        return Refusal(INVALID, "request_number: must be 0 on Initial")
    if kind is not RequestKind.INITIAL and request.request_number == 0:
        return Refusal(INVALID, "request_number: must be above 0 after Initial")
    return _check_blocks(request.rating_groups, settings, need_units=False)


def validate_event(request: pb.EventRequest, settings: Settings, now_ms: int
                   ) -> Refusal | None:
    refusal = (check_ids(request.session_id, request.account_id, settings)
               or check_event_time(request.event_time_unix_ms, now_ms, settings))
    if refusal:
        return refusal
    if request.action == pb.REQUESTED_ACTION_UNSPECIFIED:
        return Refusal(MISSING, "action: missing")
    if request.action not in EVENT_ACTIONS:
        return Refusal(INVALID, f"action: unknown value {request.action}")
    refusal = _check_refund_of(request, settings)
    if refusal:
        return refusal
    if not request.rating_groups:
        return Refusal(MISSING, "rating_groups: at least one is required")
    return _check_blocks(request.rating_groups, settings, need_units=True)


def check_session_id(session_id: str, field: str, settings: Settings) -> Refusal | None:
    """A session id (in `field`): 1..max_session_id_bytes of printable text."""
    if not session_id:
        return Refusal(MISSING, f"{field}: missing")
    if len(session_id.encode()) > settings.max_session_id_bytes:
        return Refusal(INVALID, f"{field}: longer than {settings.max_session_id_bytes} bytes")
    if not session_id.isprintable():
        return Refusal(INVALID, f"{field}: contains control characters")
    return None


def _check_refund_of(request: pb.EventRequest, settings: Settings) -> Refusal | None:
    """A refund names the charge it reverses; nothing else names one."""
    refund_of = request.refund_of_session_id
    if request.action != pb.REFUND:
        if refund_of:
            return Refusal(INVALID, "refund_of_session_id: only with action REFUND")
        return None
    if not refund_of:
        return Refusal(MISSING, "refund_of_session_id: missing: a REFUND names the session "
                       "id of the event or session whose charge it reverses (a credit that "
                       "reverses no charge is an Admin adjustment)")
    if refund_of == request.session_id:
        return Refusal(INVALID, "refund_of_session_id: the refund's own session_id; a refund "
                       "has a session id of its own")
    return check_session_id(refund_of, "refund_of_session_id", settings)


def units_of(units: pb.Units, kind: UnitKind) -> int:
    if kind is UnitKind.VOLUME and not units.HasField("total_octets"):
        return units.uplink_octets + units.downlink_octets
    value: int = getattr(units, _UNIT_FIELD[kind])
    return value


def set_units(units: pb.Units, kind: UnitKind, amount: int) -> None:
    setattr(units, _UNIT_FIELD[kind], amount)


def script_blocks(
    blocks: Sequence[pb.RatingGroupRequest], plan: Plan, rater: Rater,
    event_time_unix_ms: int, default_grant: bool,
) -> list[int | str]:
    """The charging script's block arguments (tariff status, units, rate table)."""
    args: list[int | str] = [len(blocks)]
    period = ""  # the billing period, found once and only for a tariff with tiers
    for block in blocks:
        service_id = block.service_id if block.HasField("service_id") else None
        tariff = plan.tariff_for(block.rating_group, service_id, event_time_unix_ms)
        block_id = str(block.rating_group) if service_id is None else (
            f"{block.rating_group}.{service_id}")
        tariff_id = f"{plan.name}/{block_id}"
        if tariff is None:
            args += [block_id, block.rating_group, tariff_id, "none", 0, 0, NO_UNIT, 0]
            continue
        unit, final_action = UNIT_CODES[tariff.unit_kind], _final_action(tariff)
        requested = -1
        if block.HasField("requested"):
            requested = units_of(block.requested, tariff.unit_kind)
            if requested == 0 and default_grant and not tariff.free:
                requested = tariff.default_grant_units
        used = units_of(block.used, tariff.unit_kind)
        if tariff.free:
            args += [block_id, block.rating_group, tariff_id, "free", max(requested, 0),
                     used, unit, final_action]
            continue
        if tariff.tiers and not period:
            period = plan.billing_period(event_time_unix_ms)
        # time-unit usage reported now ended now: the table looks back over it
        lookback_s = used if tariff.unit_kind is UnitKind.TIME else 0
        table = rater.rate_table(tariff, event_time_unix_ms, lookback_s, period)
        args += [block_id, block.rating_group, tariff_id, "ok", requested, used, unit,
                 final_action, *table.script_args]
    return args


def _final_action(tariff: Tariff) -> int:
    return pb.FinalUnitAction.Value(tariff.final_unit_action.name)


def _result(code: int) -> pb.ResultCode.ValueType:
    return pb.ResultCode.ValueType(code)


def _split_answer(answer: str) -> tuple[int, list[list[str]], str]:
    """'<code>;<block>;...' -> (code, blocks as fields, refusal reason or '')."""
    parts = answer.split(";")
    code = int(parts[0])
    if len(parts) > 1 and parts[1].startswith("!"):
        return code, [], parts[1][1:]
    return code, [p.split(",") for p in parts[1:]], ""


def _block_of(block_id: str) -> tuple[int, int | None]:
    """'<rating group>' or '<rating group>.<service id>' -> (rating group, service id)."""
    rating_group, _, service_id = block_id.partition(".")
    return int(rating_group), (int(service_id) if service_id else None)


def decode_credit_control(
    answer: str, request: pb.CreditControlRequest, plan: Plan, event_time_unix_ms: int,
    into: pb.CreditControlAnswer | None = None,
) -> pb.CreditControlAnswer:
    """The answer message, from the script's answer alone (a stored answer decodes the
    same whatever the retransmission carries) and the plan; written into `into` when
    given (a StreamAnswer's field: no copy of the finished message)."""
    code, fields, reason = _split_answer(answer)
    result = pb.CreditControlAnswer() if into is None else into
    result.session_id = request.session_id
    result.request_number = request.request_number
    result.result_code = _result(code)
    result.error_message = reason
    result.failure_handling = pb.FAILURE_HANDLING_RETRY_AND_TERMINATE
    blocks = result.rating_groups
    for values in fields:
        # filled in place: appending a finished message would copy it
        _rating_group_answer(values, plan, event_time_unix_ms, blocks.add())
    return result


def _rating_group_answer(values: list[str], plan: Plan, event_time_unix_ms: int,
                         answer: pb.RatingGroupAnswer) -> None:
    block = SessionBlockAnswer(*values)
    rating_group, service_id = _block_of(block.rg)
    code, granted = int(block.code), int(block.granted)
    answer.rating_group = rating_group
    answer.result_code = _result(code)
    answer.charged_micros = int(block.charged)
    if service_id is not None:
        answer.service_id = service_id
    kind = _UNIT_OF_CODE.get(block.unit)
    if kind is None or code != SUCCESS or granted == 0:
        return
    set_units(answer.granted, kind, granted)
    # a grant from a bucket ends no later than the bucket (Validity-Time)
    answer.validity_time_s = min(plan.validity_time_s,
                                 int(block.expires_in_s) or plan.validity_time_s)
    answer.quota_holding_time_s = plan.quota_holding_time_s
    threshold = granted * plan.quota_threshold_percent // 100
    if kind is UnitKind.VOLUME:
        answer.volume_quota_threshold_octets = threshold
    elif kind is UnitKind.TIME:
        answer.time_quota_threshold_s = threshold
    if block.final != "0":
        fui = answer.final_unit_indication
        fui.action = pb.FinalUnitAction.ValueType(int(block.final))
        tariff = plan.tariff_for(rating_group, service_id, event_time_unix_ms)
        if tariff is not None:
            fui.redirect_address = tariff.redirect_address
            fui.restriction_filter_ids.extend(tariff.restriction_filter_ids)


def decode_event(
    answer: str, request: pb.EventRequest, into: pb.EventAnswer | None = None,
) -> pb.EventAnswer:
    """The answer message, from the script's answer alone (as decode_credit_control)."""
    code, fields, reason = _split_answer(answer)
    result = pb.EventAnswer() if into is None else into
    result.session_id = request.session_id
    result.request_number = request.request_number
    result.result_code = _result(code)
    result.error_message = reason
    if fields and fields[-1][0].startswith("B"):
        result.balance_micros = int(fields[-1][0][1:])
        result.sufficient = fields[-1][1] == "1"
        fields = fields[:-1]
    for values in fields:
        block = EventBlockAnswer(*values)
        rating_group, service_id = _block_of(block.rg)
        item = result.rating_groups.add(
            rating_group=rating_group, result_code=_result(int(block.code)),
            amount_micros=int(block.amount), units_from_buckets=int(block.from_buckets))
        if service_id is not None:
            item.service_id = service_id
        kind = _UNIT_OF_CODE.get(block.unit)
        if kind is not None:
            set_units(item.units, kind, int(block.units))
    return result


def refusal_answer(request: pb.CreditControlRequest, refusal: Refusal,
                   into: pb.CreditControlAnswer | None = None) -> pb.CreditControlAnswer:
    answer = _refused(pb.CreditControlAnswer() if into is None else into, request, refusal)
    if refusal.result_code == pb.UNABLE_TO_COMPLY:
        # nothing was applied: retransmitting is safe, and is what the client should do
        answer.failure_handling = pb.FAILURE_HANDLING_RETRY_AND_TERMINATE
    return answer


def event_refusal_answer(request: pb.EventRequest, refusal: Refusal,
                         into: pb.EventAnswer | None = None) -> pb.EventAnswer:
    return _refused(pb.EventAnswer() if into is None else into, request, refusal)


AnswerT = TypeVar("AnswerT", pb.CreditControlAnswer, pb.EventAnswer)


def _refused(answer: AnswerT, request: pb.CreditControlRequest | pb.EventRequest,
             refusal: Refusal) -> AnswerT:
    answer.session_id = request.session_id
    answer.request_number = request.request_number
    answer.result_code = _result(refusal.result_code)
    answer.error_message = refusal.message
    return answer
