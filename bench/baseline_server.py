"""The do-nothing floor: a grpc.aio Charging server that answers every request with a
fixed answer of realistic size and touches nothing (no validation, no rating, no Redis).

It runs exactly like `creditline serve` does (uvloop, same server options, its own
process), so the ratio creditline / baseline measured with the same driver is what the
charging work costs on top of gRPC itself.

With --redis-url it is the round-trip floor: each unary call first runs one EVALSHA of a
script that does nothing (`return 1`) through Creditline's lean pipelined Redis path
(creditline.store.fastredis), then answers as above. Any server that makes one Redis round trip
per request can at best reach this: the gap from the baseline is the round trip's own
cost (the client's work, the loop turns, Redis's command handling, and on a 2-core
machine the CPU Redis takes from the others); the gap from it to Creditline is the
charging work (validation, rating, the charging script's Lua, the answer). Its Stream
answers without a round trip (the floor of the unary path only).

    python -m bench.baseline_server --listen-address 127.0.0.1:50061
    python -m bench.baseline_server --listen-address 127.0.0.1:50062 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from creditline.store.fastredis import FastScriptClient
from creditline.v1 import charging_pb2 as pb
from creditline.v1 import charging_pb2_grpc

from bench.workload import RG_SMS, RG_VOICE, RG_WEB, VOICE_REQUESTED_S, WEB_REQUESTED_OCTETS

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
# Same bound as the Creditline server's default max_message_bytes.
MAX_MESSAGE_BYTES = 64 * 1024
# A typical session id of the driver: the answers echo one of the same length.
_SESSION_ID = "gw0.bench.example.net;baseline-000000;000000"
# The round-trip floor's script: one EVALSHA that does nothing.
NOTHING_SCRIPT = "return 1"
NOTHING_SCRIPT_SHA = hashlib.sha1(NOTHING_SCRIPT.encode()).hexdigest()
REDIS_CALL_TIMEOUT_S = 10.0


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
    """Fixed answers; with `redis` (the round-trip floor) one do-nothing EVALSHA first."""

    def __init__(self, redis: FastScriptClient | None = None) -> None:
        self._redis = redis

    async def _round_trip(self) -> None:
        if self._redis is not None:
            await self._redis.evalsha(NOTHING_SCRIPT_SHA, NOTHING_SCRIPT, (), ())

    async def Initial(self, request: pb.CreditControlRequest, context: Context
                      ) -> pb.CreditControlAnswer:
        await self._round_trip()
        return INITIAL_ANSWER

    async def Update(self, request: pb.CreditControlRequest, context: Context
                     ) -> pb.CreditControlAnswer:
        await self._round_trip()
        return UPDATE_ANSWER

    async def Terminate(self, request: pb.CreditControlRequest, context: Context
                        ) -> pb.CreditControlAnswer:
        await self._round_trip()
        return TERMINATE_ANSWER

    async def Event(self, request: pb.EventRequest, context: Context) -> pb.EventAnswer:
        await self._round_trip()
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


async def start_baseline_server(listen_address: str, redis_url: str = ""
                                ) -> tuple[grpc.aio.Server, int]:
    """Starts the server (options as creditline.api.app.start_server); returns it and its port.
    With a redis_url: the round-trip floor (one do-nothing EVALSHA per unary call)."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    redis = None if not redis_url else FastScriptClient(
        redis_url, REDIS_CALL_TIMEOUT_S, REDIS_CALL_TIMEOUT_S)
    charging_pb2_grpc.add_ChargingServicer_to_server(BaselineCharging(redis), server)
    port = server.add_insecure_port(listen_address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {listen_address}")
    await server.start()
    return server, port


async def serve(listen_address: str, shutdown_grace_s: float, redis_url: str) -> None:
    server, port = await start_baseline_server(listen_address, redis_url)
    log.info("baseline charging server (%s) listening on port %d",
             "one do-nothing EVALSHA per call" if redis_url else "do-nothing", port)
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
    parser.add_argument("--redis-url", default="",
                        help="the round-trip floor: one do-nothing EVALSHA per unary call")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import uvloop

    uvloop.run(serve(args.listen_address, args.shutdown_grace_s, args.redis_url))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
