"""Builders for the requests the tests send (rating groups of tests/plan.toml)."""

from __future__ import annotations

from creditline.v1 import charging_pb2 as pb

RG_WEB = 10        # volume, 1_000 micros per started KiB, redirect when money ends
RG_VIDEO = 20      # volume, 2_000_000 micros per started MiB, restrict access
RG_VOICE = 100     # time: connect 100_000, first 60 s 600_000, then 10_000 per second
RG_SMS = 300       # service-specific: 50_000 per message
RG_FREE = 900      # free: 4011
RG_UNRATED = 55    # no tariff: 5031
RG_PEAK_VOICE = 101  # time, by the second: 30 micros in peak (08:00-20:00 UTC), 10 off-peak
RG_TIERED_DATA = 11  # volume, 1_000 micros per KiB, 500 after 1 MiB in the billing period

UNIT_FIELD = {RG_WEB: "total_octets", RG_VIDEO: "total_octets", RG_VOICE: "time_s",
              RG_SMS: "service_specific_units", RG_FREE: "time_s", RG_UNRATED: "time_s",
              RG_PEAK_VOICE: "time_s", RG_TIERED_DATA: "total_octets"}


def units(rating_group: int, amount: int) -> pb.Units:
    return pb.Units(**{UNIT_FIELD[rating_group]: amount})


def block(rating_group: int, requested: int | None = None, used: int | None = None,
          service_id: int | None = None) -> pb.RatingGroupRequest:
    message = pb.RatingGroupRequest(rating_group=rating_group)
    if requested is not None:
        message.requested.CopyFrom(units(rating_group, requested))
    if used is not None:
        message.used.CopyFrom(units(rating_group, used))
    if service_id is not None:
        message.service_id = service_id
    return message


def ccr(session_id: str, account_id: str, number: int,
        *blocks: pb.RatingGroupRequest) -> pb.CreditControlRequest:
    return pb.CreditControlRequest(session_id=session_id, account_id=account_id,
                                   request_number=number, rating_groups=list(blocks))


def granted(answer: pb.CreditControlAnswer, rating_group: int) -> int:
    for item in answer.rating_groups:
        if item.rating_group == rating_group:
            value: int = getattr(item.granted, UNIT_FIELD[rating_group])
            return value
    raise KeyError(rating_group)


def rg_answer(answer: pb.CreditControlAnswer, rating_group: int) -> pb.RatingGroupAnswer:
    for item in answer.rating_groups:
        if item.rating_group == rating_group:
            return item
    raise KeyError(rating_group)
