"""Gy/Ro credit control (RFC 4006/8506, 3GPP TS 32.299) onto the charging core: a CCR
becomes the gRPC API's CreditControlRequest or EventRequest and goes through the same
ChargingService method a gRPC call does (the same checks, pricing, script and stored
answers); its answer becomes the CCA. README "Connecting a gateway over Gy" has the AVP
mapping table.

- The account: the first Subscription-Id (END_USER_E164 first, then END_USER_IMSI, then
  the others in the order given) the identity table maps to an account; a CCR-U/T
  without one takes the account its session's CCR-I resolved (kept per process while
  the session is open). `identity_fallback = "data"` takes the Subscription-Id-Data
  itself as the account id when the table has none (trials).
- Each Multiple-Services-Credit-Control is a rating group: Rating-Group, the first
  Service-Identifier, Requested-Service-Unit (present and empty: the tariff's default
  grant), Used-Service-Unit (several are summed), the 3GPP Reporting-Reason. A CCR
  without MSCC (single service, RFC 4006 §5.1.1) is read from its top-level
  Requested/Used-Service-Unit, Rating-Group and Service-Identifier the same way.
- A retransmission (T flag, or any repeat of a CC-Request-Number) gets the stored answer:
  the core answers a repeated request number from what it stored.
- Events (CC-Request-Type EVENT_REQUEST): Requested-Action DIRECT_DEBITING,
  REFUND_ACCOUNT (the charge it reverses named by its Session-Id in CC-Correlation-Id),
  CHECK_BALANCE (Check-Balance-Result), PRICE_ENQUIRY (Cost-Information).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import Message as ProtoMessage

from creditline.api.interceptors import DiameterObserver
from creditline.api.service import ChargingService
from creditline.diameter import message as m
from creditline.diameter.codec import Avp
from creditline.diameter.dictionary import (
    CHECK_BALANCE_ENOUGH_CREDIT,
    CHECK_BALANCE_NO_CREDIT,
    VENDOR_3GPP,
    AvpCode,
    AvpCode3gpp,
    CcRequestType,
    FinalUnitAction,
    RedirectAddressType,
    RequestedAction,
    ResultCode,
    SubscriptionIdType,
)
from creditline.diameter.message import AvpError, Message
from creditline.diameter.peer import Peer, answer_to
from creditline.store.contract import GROUP_SEPARATOR, RequestKind, group_of
from creditline.v1 import charging_pb2 as pb

log = logging.getLogger(__name__)

# (Subscription-Id-Type, Subscription-Id-Data) -> the account, or None
IdentityLookup = Callable[[int, str], Awaitable[str | None]]

_KINDS = {CcRequestType.INITIAL: RequestKind.INITIAL, CcRequestType.UPDATE: RequestKind.UPDATE,
          CcRequestType.TERMINATION: RequestKind.TERMINATE}
_ACTIONS = {RequestedAction.DIRECT_DEBITING: pb.DIRECT_DEBIT,
            RequestedAction.REFUND_ACCOUNT: pb.REFUND,
            RequestedAction.CHECK_BALANCE: pb.CHECK_BALANCE,
            RequestedAction.PRICE_ENQUIRY: pb.PRICE_ENQUIRY}
# Used/Requested-Service-Unit AVPs -> Units fields, and whether the AVP is Unsigned32
_UNIT_AVPS = ((AvpCode.CC_TIME, "time_s", True), (AvpCode.CC_TOTAL_OCTETS, "total_octets", False),
              (AvpCode.CC_INPUT_OCTETS, "uplink_octets", False),
              (AvpCode.CC_OUTPUT_OCTETS, "downlink_octets", False),
              (AvpCode.CC_SERVICE_SPECIFIC_UNITS, "service_specific_units", False))
_UNIT_AVP_OF = {field: (code, is_32) for code, field, is_32 in _UNIT_AVPS}
_IDENTITY_ORDER = (SubscriptionIdType.END_USER_E164, SubscriptionIdType.END_USER_IMSI)
_FINAL_ACTIONS = {pb.TERMINATE: FinalUnitAction.TERMINATE, pb.REDIRECT: FinalUnitAction.REDIRECT,
                  pb.RESTRICT_ACCESS: FinalUnitAction.RESTRICT_ACCESS}
_FAILURE_HANDLING = {pb.FAILURE_HANDLING_TERMINATE: 0, pb.FAILURE_HANDLING_CONTINUE: 1,
                     pb.FAILURE_HANDLING_RETRY_AND_TERMINATE: 2}
MICROS_EXPONENT = -6  # Cost-Information's Unit-Value: micro-units
FAILOVER_SUPPORTED = 1  # CC-Session-Failover (RFC 4006 §8.4)
# the charging method each request type stands for, in spans and metrics
_METHODS = {CcRequestType.INITIAL: "Initial", CcRequestType.UPDATE: "Update",
            CcRequestType.TERMINATION: "Terminate"}


@dataclass(frozen=True, slots=True)
class GyRules:
    origin_host: str
    origin_realm: str
    identity_fallback: str      # "none" or "data"
    currency_code: int          # ISO 4217 numeric, in Cost-Information
    max_sessions: int           # sessions whose account and peer a process keeps


@dataclass(frozen=True, slots=True)
class OpenSession:
    account_id: str
    peer: Peer


class GyApplication:
    """Answers CCRs through the Charging service; keeps which peer and account each open
    session has (RAR and ASR go to that peer)."""

    def __init__(self, charging: ChargingService, identities: IdentityLookup,
                 rules: GyRules, observe: DiameterObserver | None = None) -> None:
        self._charging = charging
        self._observe = observe  # spans and metrics of the charging requests, when on
        self._identities = identities
        self._rules = rules
        self.sessions: dict[str, OpenSession] = {}  # session id -> (oldest first)
        self.by_account: dict[str, set[str]] = {}    # account id -> its session ids

    async def answer(self, peer: Peer, ccr: Message) -> Message:
        m.check_mandatory(ccr.avps)
        session_id = m.utf8(m.required(ccr.avps, AvpCode.SESSION_ID))
        request_type = m.unsigned32(m.required(ccr.avps, AvpCode.CC_REQUEST_TYPE))
        number = m.unsigned32(m.required(ccr.avps, AvpCode.CC_REQUEST_NUMBER))
        application = m.unsigned32(m.required(ccr.avps, AvpCode.AUTH_APPLICATION_ID))
        if application != 4:
            raise AvpError(ResultCode.INVALID_AVP_VALUE, f"Auth-Application-Id {application}",
                           m.encode(m.u32(AvpCode.AUTH_APPLICATION_ID, application)))
        if request_type not in CcRequestType.__members__.values():
            raise AvpError(ResultCode.INVALID_AVP_VALUE, f"CC-Request-Type {request_type}",
                           m.encode(m.u32(AvpCode.CC_REQUEST_TYPE, request_type)))
        kind = CcRequestType(request_type)
        account_id = await self._account(ccr.avps, session_id, kind)
        frame = [m.text(AvpCode.ORIGIN_HOST, self._rules.origin_host),
                 m.text(AvpCode.ORIGIN_REALM, self._rules.origin_realm),
                 m.u32(AvpCode.AUTH_APPLICATION_ID, 4), m.u32(AvpCode.CC_REQUEST_TYPE, kind),
                 m.u32(AvpCode.CC_REQUEST_NUMBER, number)]
        if account_id is None:
            return answer_to(ccr, ResultCode.USER_UNKNOWN, *frame, m.text(
                AvpCode.ERROR_MESSAGE, "no Subscription-Id of the request names an account",
                mandatory=False))
        if kind is CcRequestType.EVENT:
            return await self._event(ccr, session_id, number, account_id, frame)
        return await self._session(peer, ccr, session_id, number, account_id, kind, frame)

    # ------------------------------------------------------------------ the account
    async def _account(self, avps: Sequence[Avp], session_id: str, kind: CcRequestType
                       ) -> str | None:
        identities = _subscription_ids(avps)
        known = self.sessions.get(session_id)
        if known is not None and kind is not CcRequestType.INITIAL:
            return known.account_id
        for id_type, data in identities:
            account_id = await self._identities(id_type, data)
            if account_id is not None:
                return account_id
        if self._rules.identity_fallback == "data" and identities:
            return identities[0][1]
        return None

    # ------------------------------------------------------------------ sessions
    async def _session(self, peer: Peer, ccr: Message, session_id: str, number: int,
                       account_id: str, kind: CcRequestType, frame: list[Avp]) -> Message:
        request = pb.CreditControlRequest(
            session_id=session_id, request_number=number, account_id=account_id,
            event_time_unix_ms=_event_time_ms(ccr.avps), rating_groups=_rating_groups(ccr.avps))
        answer = pb.CreditControlAnswer.FromString(await self._charged(
            _METHODS[kind], request, lambda: self._charging.credit_control(request, _KINDS[kind]),
            pb.CreditControlAnswer))
        self._track(session_id, account_id, peer, kind, answer.result_code)
        avps = [*frame, *(self._mscc(rg) for rg in answer.rating_groups)]
        if kind is CcRequestType.INITIAL:
            # (a session's state is in Redis: any process, over any connection, serves its
            # next CCR that carries the Subscription-Id)
            avps.append(m.u32(AvpCode.CC_SESSION_FAILOVER, FAILOVER_SUPPORTED))
        if answer.failure_handling in _FAILURE_HANDLING:
            avps.append(m.u32(AvpCode.CREDIT_CONTROL_FAILURE_HANDLING,
                              _FAILURE_HANDLING[answer.failure_handling]))
        if answer.error_message:
            avps.append(m.text(AvpCode.ERROR_MESSAGE, answer.error_message[:200], mandatory=False))
        return answer_to(ccr, answer.result_code or ResultCode.UNABLE_TO_COMPLY, *avps)

    def _track(self, session_id: str, account_id: str, peer: Peer, kind: CcRequestType,
               result_code: int) -> None:
        """Which peer and account an open session has: kept from an answered CCR-I or U,
        dropped at its CCR-T; the oldest forgotten past max_sessions."""
        if kind is CcRequestType.TERMINATION or result_code == ResultCode.UNKNOWN_SESSION_ID:
            self.forget(session_id)
            return
        self.forget(session_id)  # (then added last: the newest)
        self.sessions[session_id] = OpenSession(account_id, peer)
        self.by_account.setdefault(account_id, set()).add(session_id)
        while len(self.sessions) > self._rules.max_sessions:
            self.forget(next(iter(self.sessions)))

    def forget(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        ids = self.by_account.get(session.account_id)
        if ids is not None:
            ids.discard(session_id)
            if not ids:
                del self.by_account[session.account_id]

    def sessions_of(self, account_id: str) -> list[str]:
        """The open sessions this process keeps of the account and, for a group, of its
        members."""
        found = list(self.by_account.get(account_id, ()))
        prefix = account_id + GROUP_SEPARATOR
        if group_of(account_id) is None:
            found += [sid for member, ids in self.by_account.items()
                      if member.startswith(prefix) for sid in ids]
        return found

    def _mscc(self, rg: pb.RatingGroupAnswer) -> Avp:
        avps: list[Avp] = []
        if rg.HasField("granted") and rg.granted.ListFields():
            avps.append(m.group(AvpCode.GRANTED_SERVICE_UNIT, _units_avps(rg.granted)))
        avps.append(m.u32(AvpCode.RATING_GROUP, rg.rating_group))
        if rg.HasField("service_id"):
            avps.append(m.u32(AvpCode.SERVICE_IDENTIFIER, rg.service_id))
        if rg.validity_time_s:
            avps.append(m.u32(AvpCode.VALIDITY_TIME, rg.validity_time_s))
        avps.append(m.u32(AvpCode.RESULT_CODE, rg.result_code))
        if rg.final_unit_indication.action in _FINAL_ACTIONS:
            avps.append(_final_unit_indication(rg.final_unit_indication))
        if rg.HasField("time_quota_threshold_s"):
            avps.append(m.u32(AvpCode3gpp.TIME_QUOTA_THRESHOLD, rg.time_quota_threshold_s,
                              VENDOR_3GPP))
        if rg.HasField("volume_quota_threshold_octets"):
            avps.append(m.u32(AvpCode3gpp.VOLUME_QUOTA_THRESHOLD,
                              min(rg.volume_quota_threshold_octets, 0xFFFFFFFF), VENDOR_3GPP))
        if rg.quota_holding_time_s:
            avps.append(m.u32(AvpCode3gpp.QUOTA_HOLDING_TIME, rg.quota_holding_time_s, VENDOR_3GPP))
        return m.group(AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL, avps)

    # ------------------------------------------------------------------ events
    async def _event(self, ccr: Message, session_id: str, number: int, account_id: str,
                     frame: list[Avp]) -> Message:
        action_avp = m.find(ccr.avps, AvpCode.REQUESTED_ACTION)
        action = m.unsigned32(action_avp) if action_avp else RequestedAction.DIRECT_DEBITING
        if action not in _ACTIONS:
            raise AvpError(ResultCode.INVALID_AVP_VALUE, f"Requested-Action {action}",
                           m.encode(action_avp) if action_avp else b"")
        correlation = m.find(ccr.avps, AvpCode.CC_CORRELATION_ID)
        request = pb.EventRequest(
            session_id=session_id, request_number=number, account_id=account_id,
            event_time_unix_ms=_event_time_ms(ccr.avps), action=_ACTIONS[RequestedAction(action)],
            rating_groups=_rating_groups(ccr.avps),
            refund_of_session_id=correlation[3].decode(errors="replace") if correlation else "")
        answer = pb.EventAnswer.FromString(await self._charged(
            "Event", request, lambda: self._charging.event(request), pb.EventAnswer))
        avps = [*frame, m.u32(AvpCode.REQUESTED_ACTION, action)]
        avps += [self._event_mscc(rg) for rg in answer.rating_groups]
        if action == RequestedAction.CHECK_BALANCE:
            avps.append(m.u32(AvpCode.CHECK_BALANCE_RESULT, CHECK_BALANCE_ENOUGH_CREDIT
                              if answer.sufficient else CHECK_BALANCE_NO_CREDIT))
        if action in (RequestedAction.PRICE_ENQUIRY, RequestedAction.DIRECT_DEBITING):
            total = sum(rg.amount_micros for rg in answer.rating_groups)
            avps.append(self._cost(total))
        if answer.error_message:
            avps.append(m.text(AvpCode.ERROR_MESSAGE, answer.error_message[:200], mandatory=False))
        return answer_to(ccr, answer.result_code or ResultCode.UNABLE_TO_COMPLY, *avps)

    async def _charged(self, method: str, request: ProtoMessage,
                       charge: Callable[[], Awaitable[bytes]],
                       answer_class: type[ProtoMessage]) -> bytes:
        """The charging core's answer (wire bytes), observed when something observes."""
        if self._observe is None:
            return await charge()
        return await self._observe(method, request, charge, answer_class)

    def _event_mscc(self, rg: pb.EventRatingGroupAnswer) -> Avp:
        avps: list[Avp] = []
        if rg.units.ListFields():
            avps.append(m.group(AvpCode.GRANTED_SERVICE_UNIT, _units_avps(rg.units)))
        avps.append(m.u32(AvpCode.RATING_GROUP, rg.rating_group))
        if rg.HasField("service_id"):
            avps.append(m.u32(AvpCode.SERVICE_IDENTIFIER, rg.service_id))
        avps.append(m.u32(AvpCode.RESULT_CODE, rg.result_code))
        return m.group(AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL, avps)

    def _cost(self, amount_micros: int) -> Avp:
        return m.group(AvpCode.COST_INFORMATION, [
            m.group(AvpCode.UNIT_VALUE, [m.i64(AvpCode.VALUE_DIGITS, amount_micros),
                                   m.i32(AvpCode.EXPONENT, MICROS_EXPONENT)]),
            m.u32(AvpCode.CURRENCY_CODE, self._rules.currency_code)])


# ---------------------------------------------------------------------- reading a CCR

def _subscription_ids(avps: Sequence[Avp]) -> list[tuple[int, str]]:
    """(type, data) of the request's Subscription-Ids, E164 first, then IMSI, then the
    rest in their order."""
    found = []
    for avp in m.find_all(avps, AvpCode.SUBSCRIPTION_ID):
        inside = m.grouped(avp)
        found.append((m.unsigned32(m.required(inside, AvpCode.SUBSCRIPTION_ID_TYPE)),
                      m.utf8(m.required(inside, AvpCode.SUBSCRIPTION_ID_DATA))))
    rank: dict[int, int] = {t: i for i, t in enumerate(_IDENTITY_ORDER)}
    return sorted(found, key=lambda item: rank.get(item[0], len(rank)))


def _event_time_ms(avps: Sequence[Avp]) -> int:
    timestamp = m.find(avps, AvpCode.EVENT_TIMESTAMP)
    return m.time_unix_ms(timestamp) if timestamp is not None else 0


def _units(avp: Avp) -> pb.Units:
    units = pb.Units()
    inside = m.grouped(avp)
    for code, field, is_32 in _UNIT_AVPS:
        found = m.find(inside, code)
        if found is not None:
            setattr(units, field, m.unsigned32(found) if is_32 else m.unsigned64(found))
    return units


def _add_units(total: pb.Units, more: pb.Units) -> None:
    for descriptor, value in more.ListFields():
        setattr(total, descriptor.name, getattr(total, descriptor.name) + value)


def _rating_group(avps: Sequence[Avp]) -> pb.RatingGroupRequest:
    """One MSCC (or the top level of a CCR without MSCC) as a rating group."""
    block = pb.RatingGroupRequest()
    rating_group = m.find(avps, AvpCode.RATING_GROUP)
    if rating_group is not None:
        block.rating_group = m.unsigned32(rating_group)
    service = m.find(avps, AvpCode.SERVICE_IDENTIFIER)
    if service is not None:
        block.service_id = m.unsigned32(service)
    requested = m.find(avps, AvpCode.REQUESTED_SERVICE_UNIT)
    if requested is not None:
        block.requested.CopyFrom(_units(requested))
    used = m.find_all(avps, AvpCode.USED_SERVICE_UNIT)
    if used:
        total = pb.Units()
        for avp in used:
            _add_units(total, _units(avp))
        block.used.CopyFrom(total)
    block.reporting_reason = _reporting_reason(avps, used)  # type: ignore[assignment]
    return block


def _reporting_reason(avps: Sequence[Avp], used: list[Avp]) -> int:
    """The 3GPP Reporting-Reason (TS 32.299 §7.2.175), of the MSCC or of its USU, as the
    API's ReportingReason (its values + 1: 0 is unspecified there)."""
    found = m.find(avps, AvpCode3gpp.REPORTING_REASON, VENDOR_3GPP)
    for avp in used:
        found = found or m.find(m.grouped(avp), AvpCode3gpp.REPORTING_REASON, VENDOR_3GPP)
    return m.unsigned32(found) + 1 if found is not None else 0


def _rating_groups(avps: Sequence[Avp]) -> list[pb.RatingGroupRequest]:
    groups = m.find_all(avps, AvpCode.MULTIPLE_SERVICES_CREDIT_CONTROL)
    if groups:
        return [_rating_group(m.grouped(g)) for g in groups]
    if m.find(avps, AvpCode.REQUESTED_SERVICE_UNIT) or m.find(avps, AvpCode.USED_SERVICE_UNIT):
        return [_rating_group(avps)]
    return []


# ---------------------------------------------------------------------- writing a CCA

def _units_avps(units: pb.Units) -> list[Avp]:
    avps = []
    for descriptor, value in units.ListFields():
        code, is_32 = _UNIT_AVP_OF[descriptor.name]
        avps.append(m.u32(code, value) if is_32 else m.u64(code, value))
    return avps


def _final_unit_indication(fui: pb.FinalUnitIndication) -> Avp:
    avps = [m.u32(AvpCode.FINAL_UNIT_ACTION, _FINAL_ACTIONS[fui.action])]
    if fui.redirect_address:
        avps.append(m.group(AvpCode.REDIRECT_SERVER, [
            m.u32(AvpCode.REDIRECT_ADDRESS_TYPE, RedirectAddressType.URL),
            m.text(AvpCode.REDIRECT_SERVER_ADDRESS, fui.redirect_address)]))
    avps += [m.text(AvpCode.FILTER_ID, f) for f in fui.restriction_filter_ids]
    return m.group(AvpCode.FINAL_UNIT_INDICATION, avps)
