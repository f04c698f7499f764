"""What the load looks like: accounts, session flows and events, as protobuf messages.

Pure (no I/O, no asyncio, no gevent) so that the asyncio driver and the Locust user send
exactly the same messages. Rating groups are those of server/creditline/charging/plans/default.toml:
RG 10 web (volume), RG 100 voice (time), RG 300 SMS (service-specific units).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from creditline.v1 import charging_pb2 as pb

RG_WEB = 10
RG_VOICE = 100
RG_SMS = 300

# Normal accounts: a session costs about 4.50 (4 x 60 s of voice, 2 MiB of web), so
# 10,000.00 pays for ~2,000 sessions per account: more than a 10-minute soak sends.
ACCOUNT_BALANCE_MICROS = 10_000_000_000
# Hot accounts carry many sessions at once; still below 2^53 (the scripts' doubles).
HOT_ACCOUNT_BALANCE_MICROS = 10_000_000_000_000

# One session's usage per report: what a gateway re-asking at its threshold looks like.
WEB_REQUESTED_OCTETS = 1_048_576
WEB_USED_OCTETS = 524_288
VOICE_REQUESTED_S = 300
VOICE_USED_S = 60
SMS_PER_EVENT = 1

INITIAL, UPDATE, TERMINATE, EVENT = "Initial", "Update", "Terminate", "Event"
METHODS = (INITIAL, UPDATE, TERMINATE, EVENT)


@dataclass(frozen=True, slots=True)
class Workload:
    """The mix of the load. Shares are of requests (events) and of sessions (hot keys)."""

    account_count: int = 10_000
    hot_account_count: int = 5
    # share of sessions and events that land on one of the hot accounts
    hot_share: float = 0.10
    # share of all requests that are Event DIRECT_DEBIT (the rest are session requests)
    event_request_share: float = 0.20
    updates_per_session: int = 3
    account_prefix: str = "bench"

    def __post_init__(self) -> None:
        if self.account_count <= 0 or self.hot_account_count < 0:
            raise ValueError("account_count must be > 0 and hot_account_count >= 0")
        if not 0.0 <= self.hot_share <= 1.0 or not 0.0 <= self.event_request_share < 1.0:
            raise ValueError("hot_share must be in [0, 1] and event_request_share in [0, 1)")
        if self.updates_per_session < 0:
            raise ValueError("updates_per_session must be >= 0")

    @property
    def requests_per_session(self) -> int:
        return self.updates_per_session + 2

    @property
    def event_flow_share(self) -> float:
        """Share of flows that are events, so that events are event_request_share of the
        requests: a session flow sends requests_per_session requests, an event one."""
        share, per_session = self.event_request_share, self.requests_per_session
        return share * per_session / (1.0 - share + share * per_session)

    def account_id(self, index: int) -> str:
        return f"{self.account_prefix}-{index:06d}"

    def hot_account_id(self, index: int) -> str:
        return f"{self.account_prefix}-hot-{index}"

    def all_accounts(self) -> list[tuple[str, int]]:
        """(account id, initial balance) of every account the load uses."""
        normal = [(self.account_id(i), ACCOUNT_BALANCE_MICROS)
                  for i in range(self.account_count)]
        hot = [(self.hot_account_id(i), HOT_ACCOUNT_BALANCE_MICROS)
               for i in range(self.hot_account_count)]
        return normal + hot

    def pick_account(self, rng: random.Random) -> str:
        if self.hot_account_count and rng.random() < self.hot_share:
            return self.hot_account_id(rng.randrange(self.hot_account_count))
        return self.account_id(rng.randrange(self.account_count))


def _block(rating_group: int, requested: pb.Units | None, used: pb.Units | None,
           reason: pb.ReportingReason.ValueType = pb.REPORTING_REASON_UNSPECIFIED
           ) -> pb.RatingGroupRequest:
    block = pb.RatingGroupRequest(rating_group=rating_group, reporting_reason=reason)
    if requested is not None:
        block.requested.CopyFrom(requested)
    if used is not None:
        block.used.CopyFrom(used)
    return block


def session_requests(session_id: str, account_id: str, updates: int
                     ) -> list[tuple[str, pb.CreditControlRequest]]:
    """A whole session: Initial (web + voice), `updates` Updates reporting usage and asking
    again, and a Terminate with the final usage. Request numbers 0, 1, 2, ..."""
    web_ask = pb.Units(total_octets=WEB_REQUESTED_OCTETS)
    voice_ask = pb.Units(time_s=VOICE_REQUESTED_S)
    web_used = pb.Units(total_octets=WEB_USED_OCTETS)
    voice_used = pb.Units(time_s=VOICE_USED_S)
    flow = [(INITIAL, pb.CreditControlRequest(
        session_id=session_id, account_id=account_id, request_number=0,
        rating_groups=[_block(RG_WEB, web_ask, None), _block(RG_VOICE, voice_ask, None)]))]
    for number in range(1, updates + 1):
        flow.append((UPDATE, pb.CreditControlRequest(
            session_id=session_id, account_id=account_id, request_number=number,
            rating_groups=[_block(RG_WEB, web_ask, web_used, pb.THRESHOLD),
                           _block(RG_VOICE, voice_ask, voice_used, pb.VALIDITY_TIME)])))
    flow.append((TERMINATE, pb.CreditControlRequest(
        session_id=session_id, account_id=account_id, request_number=updates + 1,
        rating_groups=[_block(RG_WEB, None, web_used, pb.FINAL),
                       _block(RG_VOICE, None, voice_used, pb.FINAL)])))
    return flow


def event_request(session_id: str, account_id: str) -> pb.EventRequest:
    """One SMS charged by direct debit (an SMS centre's CCR-Event)."""
    return pb.EventRequest(
        session_id=session_id, account_id=account_id, request_number=0,
        action=pb.DIRECT_DEBIT,
        rating_groups=[pb.RatingGroupRequest(
            rating_group=RG_SMS, requested=pb.Units(service_specific_units=SMS_PER_EVENT))])


def session_id(source: str, run_tag: str, number: int) -> str:
    """Diameter-like session ids (<origin host>;<high>;<low>): unique per run and process."""
    return f"{source}.bench.example.net;{run_tag};{number}"
