"""The charging path between the gRPC messages and the charging script.

`RequestPath` checks a request (naming the first bad field) and writes the answer from the
script's answer string, in the rating kernels (native/); `script_blocks` turns the
rating-group blocks into the script's arguments (tariff status, units, price schedule).
No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from creditline.charging.kernels import Kernels, Refused, RequestRules
from creditline.charging.rating import Plan, Rater, Tariff, UnitKind
from creditline.settings import Settings
from creditline.store.contract import ID_CHARACTERS, EventAction, RequestKind
from creditline.v1 import charging_pb2 as pb

MISSING = pb.MISSING_AVP
UNABLE_TO_COMPLY = pb.UNABLE_TO_COMPLY

# Bucket ids to the account ids' rule (the kernels check those).
ACCOUNT_ID_PATTERN = re.compile(f"[{re.escape(ID_CHARACTERS)}]+")
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


def request_rules(settings: Settings) -> RequestRules:
    """What the kernels check a request against."""
    return (settings.max_session_id_bytes, settings.max_account_id_bytes,
            settings.max_event_age_s, settings.max_event_ahead_s,
            settings.max_rating_groups_per_request, _REPORTING_REASONS)


class RequestPath:
    """Everything the server computes per charging request around the script, in the
    kernels it was given (the compiled ones, or their pure-Python twin with
    CREDITLINE_PURE_RATING=1): the request's checks, and the script's answer written
    straight into the answer's wire bytes (the handlers send bytes as they are). The script
    arguments are script_blocks'."""

    def __init__(self, kernels: Kernels, plan: Plan, settings: Settings) -> None:
        self.kernels = kernels
        self._module = kernels.module
        self._plan = plan
        self._rules = request_rules(settings)
        self._plan_times = (plan.validity_time_s, plan.quota_holding_time_s,
                            plan.quota_threshold_percent)
        # answers written by these kernels: what shows that the switch took
        self.answers_written = 0

    def check_credit_control(self, request: pb.CreditControlRequest, kind: RequestKind,
                             now_ms: int) -> Refused:
        """The first thing wrong with the request: (result code, message naming the field)."""
        return self._module.validate_credit_control(
            request, kind is RequestKind.INITIAL, self._rules, now_ms)

    def check_event(self, request: pb.EventRequest, now_ms: int) -> Refused:
        return self._module.validate_event(request, self._rules, now_ms)

    def credit_control_answer(self, answer: str, request: pb.CreditControlRequest,
                              event_time_unix_ms: int) -> bytes:
        """The CreditControlAnswer from the script's answer alone (a stored answer encodes
        the same whatever the retransmission carries) and the plan."""
        self.answers_written += 1

        def final_unit_of(rating_group: int, service_id: int | None
                          ) -> tuple[str, Sequence[str]]:
            tariff = self._plan.tariff_for(rating_group, service_id, event_time_unix_ms)
            if tariff is None:
                return "", ()
            return tariff.redirect_address, tariff.restriction_filter_ids

        return self._module.encode_credit_control(
            answer, request.session_id, request.request_number, self._plan_times,
            final_unit_of)

    def event_answer(self, answer: str, request: pb.EventRequest) -> bytes:
        self.answers_written += 1
        return self._module.encode_event(answer, request.session_id, request.request_number)

    def refusal(self, request: pb.CreditControlRequest, refused: tuple[int, str]) -> bytes:
        """A CreditControlAnswer refusing the request: nothing was charged."""
        self.answers_written += 1
        return self._module.encode_credit_control_refusal(
            request.session_id, request.request_number, *refused)

    def event_refusal(self, request: pb.EventRequest, refused: tuple[int, str]) -> bytes:
        self.answers_written += 1
        return self._module.encode_event_refusal(
            request.session_id, request.request_number, *refused)

    def stream_answer(self, correlation_id: int, field_number: int, answer: bytes) -> bytes:
        """A StreamAnswer holding an encoded answer in its field `field_number`."""
        return self._module.encode_stream_answer(correlation_id, field_number, answer)



def units_of(units: pb.Units, kind: UnitKind) -> int:
    if kind is UnitKind.VOLUME and not units.HasField("total_octets"):
        return units.uplink_octets + units.downlink_octets
    value: int = getattr(units, _UNIT_FIELD[kind])
    return value


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
