"""The do-nothing floor: a grpc.aio Charging server that answers every request with a
fixed answer of realistic size and touches nothing (no validation, no rating, no Redis).

It runs exactly like `creditline serve` does (uvloop, same server options, its own
process), so the ratio creditline / baseline measured with the same driver is what the
charging work costs on top of gRPC itself.

    python -m bench.baseline_server --listen-address 127.0.0.1:50061
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc

from bench.workload import RG_SMS, RG_VOICE, RG_WEB, VOICE_REQUESTED_S, WEB_REQUESTED_OCTETS

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
# Same bound as the Creditline server's default max_message_bytes.
MAX_MESSAGE_BYTES = 64 * 1024
# A typical session id of the driver: the answers echo one of the same length.
_SESSION_ID = "gw0.bench.example.net;baseline-000000;000000"


def _grant(rating_group: int, units: pb.Units, charged_micros: int) -> pb.RatingGroupAnswer:
    # What Creditline answers for a grant of the default plan: validity, threshold, holding.
    answer = pb.RatingGroupAnswer(
        rating_group=rating_group, result_code=pb.SUCCESS, granted=units,
        validity_time_s=1800, quota_holding_time_s=300, charged_micros=charged_micros)
    if units.HasField("time_s"):
        answer.time_quota_threshold_s = units.time_s // 5
    else:
        answer.volume_quota_threshold_octets = units.total_octets // 5
    return answer


def _session_answer(request_number: int, charged: bool, granted: bool
                    ) -> pb.CreditControlAnswer:
    web = pb.Units(total_octets=WEB_REQUESTED_OCTETS if granted else 0)
    voice = pb.Units(time_s=VOICE_REQUESTED_S if granted else 0)
    return pb.CreditControlAnswer(
        session_id=_SESSION_ID, request_number=request_number, result_code=pb.SUCCESS,
        rating_groups=[_grant(RG_WEB, web, 512_000 if charged else 0),
                       _grant(RG_VOICE, voice, 700_000 if charged else 0)])


INITIAL_ANSWER = _session_answer(0, charged=False, granted=True)
UPDATE_ANSWER = _session_answer(1, charged=True, granted=True)
TERMINATE_ANSWER = _session_answer(4, charged=True, granted=False)
_STREAM_ANSWERS = {"initial": INITIAL_ANSWER, "update": UPDATE_ANSWER,
                   "terminate": TERMINATE_ANSWER}
EVENT_ANSWER = pb.EventAnswer(
    session_id=_SESSION_ID, result_code=pb.SUCCESS, balance_micros=9_999_950_000,
    rating_groups=[pb.EventRatingGroupAnswer(
        rating_group=RG_SMS, result_code=pb.SUCCESS,
        units=pb.Units(service_specific_units=1), amount_micros=50_000)])


class BaselineCharging(charging_pb2_grpc.ChargingServicer):
    async def Initial(self, request: pb.CreditControlRequest, context: Context
                      ) -> pb.CreditControlAnswer:
        return INITIAL_ANSWER

    async def Update(self, request: pb.CreditControlRequest, context: Context
                     ) -> pb.CreditControlAnswer:
        return UPDATE_ANSWER

    async def Terminate(self, request: pb.CreditControlRequest, context: Context
                        ) -> pb.CreditControlAnswer:
        return TERMINATE_ANSWER

    async def Event(self, request: pb.EventRequest, context: Context) -> pb.EventAnswer:
        return EVENT_ANSWER

    async def Stream(self, requests: AsyncIterator[pb.StreamRequest], context: Context
                     ) -> AsyncIterator[pb.StreamAnswer]:
        # Each request answered at once, in order, with the fixed answer of its kind
        # and its correlation id: the floor of the streaming transport.
        async for request in requests:
            which = request.WhichOneof("request")
            if which == "event":
                yield pb.StreamAnswer(correlation_id=request.correlation_id,
                                      event=EVENT_ANSWER)
            else:
                yield pb.StreamAnswer(correlation_id=request.correlation_id,
                                      credit_control=_STREAM_ANSWERS.get(which, UPDATE_ANSWER))


async def start_baseline_server(listen_address: str) -> tuple[grpc.aio.Server, int]:
    """Starts the server (options as creditline.app.start_server); returns it and its port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    charging_pb2_grpc.add_ChargingServicer_to_server(BaselineCharging(), server)
    port = server.add_insecure_port(listen_address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen_address}")
    await server.start()
    return server, port


async def serve(listen_address: str, shutdown_grace_s: float) -> None:
    server, port = await start_baseline_server(listen_address)
    log.info("baseline (do-nothing) charging server listening on port %d", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # The grace lets the driver's calls in flight get their answers.
    await server.stop(shutdown_grace_s)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server",
                                     description="do-nothing Charging server (the floor)")
    parser.add_argument("--listen-address", default="127.0.0.1:50061")
    parser.add_argument("--shutdown-grace-s", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import uvloop

    uvloop.run(serve(args.listen_address, args.shutdown_grace_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
