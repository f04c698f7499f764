"""What one server-streamed gRPC message costs a bare grpc.aio server, with no Creditline
code: the floor under `Notifications.Subscribe`, which sends one message per event.

    python -m bench.grpc_stream_cost [--streams 100] [--messages 300] [--pace-s 0.005]

A child process serves a server-streaming method that writes --messages messages of 150
bytes on each call (back to back, or one every --pace-s, as events reach a subscriber);
this process opens --streams calls on one channel, reads them all, and prints the
server's CPU per message (its process time between the start and the end of the reads).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc
import uvloop
from creditline.store.redis_process import free_port

MESSAGE = b"x" * 150  # about one encoded ChargeEvent
METHOD = "/bench.Stream/Messages"


async def _serve(port: int, messages: int, pace_s: float) -> None:
    async def messages_of(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                          ) -> None:
        for _ in range(messages):
            if pace_s > 0:
                await asyncio.sleep(pace_s)
            await context.write(MESSAGE)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Stream", {"Messages": grpc.unary_stream_rpc_method_handler(messages_of)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # the reads start
    start_s = time.process_time()
    await loop.run_in_executor(None, sys.stdin.readline)  # the reads ended
    print(time.process_time() - start_s, flush=True)
    await server.stop(None)


async def _read(streams: int, messages: int, pace_s: float) -> str:
    port = free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.grpc_stream_cost", "--serve", str(port),
        "--messages", str(messages), "--pace-s", str(pace_s),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    await child.stdout.readline()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(METHOD)

        async def count() -> int:
            return sum([1 async for _ in call(b"")])

        child.stdin.write(b"start\n")
        start_s = time.perf_counter()
        received = sum(await asyncio.gather(*(count() for _ in range(streams))))
        wall_s = time.perf_counter() - start_s
        child.stdin.write(b"end\n")
        cpu_s = float(await child.stdout.readline())
    await child.wait()
    return (f"{streams} streams, {received} messages in {wall_s:.2f} s ({received / wall_s:.0f}"
            f"/s), paced {pace_s} s: server CPU {1e6 * cpu_s / received:.1f} us per message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--messages", type=int, default=300, help="per stream")
    parser.add_argument("--pace-s", type=float, default=0.0,
                        help="pause before each message (0: back to back)")
    parser.add_argument("--serve", type=int, metavar="PORT", help="(internal) be the server")
    args = parser.parse_args()
    uvloop.install()
    if args.serve:
        asyncio.run(_serve(args.serve, args.messages, args.pace_s))
    else:
        print(asyncio.run(_read(args.streams, args.messages, args.pace_s)))


if __name__ == "__main__":
    main()
