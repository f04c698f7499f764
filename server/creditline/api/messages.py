"""The charging path between the gRPC messages and the charging script.

`RequestPath` checks a request (naming the first bad field), turns its rating-group blocks
into the script's arguments (tariff status, units, rate table) and writes the answer from
the script's answer string, in the rating kernels (native/). No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from creditline.charging.kernels import (
    KernelBlockPlan,
    KernelModule,
    Kernels,
    Refused,
    RequestRules,
)
from creditline.charging.rating import Plan, Rater, Tariff, TariffKey, UnitKind
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
# A block's unit kind as the charging script's arguments and answers carry it (the kernels
# send "-" when the rating group has no tariff), so that a stored answer decodes without
# the request.
UNIT_CODES = {UnitKind.TIME: "t", UnitKind.VOLUME: "v", UnitKind.SERVICE_SPECIFIC: "s"}


def request_rules(settings: Settings) -> RequestRules:
    """What the kernels check a request against."""
    return (settings.max_session_id_bytes, settings.max_account_id_bytes,
            settings.max_event_age_s, settings.max_event_ahead_s,
            settings.max_rating_groups_per_request, _REPORTING_REASONS)


class RequestPath:
    """Everything the server computes per charging request around the script, in the
    kernels it was given (the compiled ones, or their pure-Python twin with
    CREDITLINE_PURE_RATING=1): the request's checks, its blocks' script arguments, and the
    script's answer written straight into the answer's wire bytes (the handlers send bytes
    as they are)."""

    def __init__(self, kernels: Kernels, plan: Plan, rater: Rater, settings: Settings
                 ) -> None:
        self.kernels = kernels
        self._module = kernels.module
        self._plan = plan
        self._blocks = block_plan(kernels, plan, rater)
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

    def script_blocks(self, blocks: Sequence[pb.RatingGroupRequest], event_time_ms: int,
                      default_grant: bool) -> list[int | str | bytes]:
        """The charging script's block arguments (store/contract.py BLOCK_FIELDS, then a
        rated block's rate table); default_grant: a block asking for 0 units is granted
        its tariff's default_grant_units."""
        return self._blocks.script_blocks(blocks, event_time_ms, default_grant)

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


def block_plan(kernels: Kernels, plan: Plan, rater: Rater) -> KernelBlockPlan:
    """The plan as the kernels read it per request: each tariff version, with its rate
    table's arguments when the rater says the table is fixed; the other tables are the
    rater's, asked per request."""
    module = kernels.module

    def rate_args(tariff: Tariff, event_time_ms: int, lookback_s: int, period: str
                  ) -> Sequence[int | str | bytes]:
        return rater.rate_table(tariff, event_time_ms, lookback_s, period).script_args

    kernel_plan = module.BlockPlan(plan.name, rate_args, plan.billing_period)
    for key in dict.fromkeys([*plan.tariffs, *plan.tariff_versions]):
        versions = plan.tariff_versions.get(key)
        # a tariff without versions is in force at any time (Plan.tariff_for)
        dated = [(module.ACTIVE_ALWAYS_MS, plan.tariffs[key])] if versions is None else [
            (version.active_from_unix_ms, version) for version in versions]
        for active_from_ms, tariff in dated:
            _add_version(kernel_plan, module, key, active_from_ms, tariff, rater)
    return kernel_plan


def _add_version(kernel_plan: KernelBlockPlan, module: KernelModule, key: TariffKey,
                 active_from_ms: int, tariff: Tariff, rater: Rater) -> None:
    table = None if tariff.free else rater.fixed_table(tariff)
    how = module.FREE if tariff.free else module.RATED if table is None else module.FIXED
    rating_group, service_id = key
    kernel_plan.add_version(
        rating_group, -1 if service_id is None else service_id, active_from_ms, how,
        UNIT_CODES[tariff.unit_kind], _final_action(tariff), tariff.default_grant_units,
        bool(tariff.tiers), None if table is None else table.script_args, tariff)


def _final_action(tariff: Tariff) -> int:
    return pb.FinalUnitAction.Value(tariff.final_unit_action.name)
