"""How often a request needs a second round trip because its account is on another plan
than the server assumed, with accounts spread over many plans.

    python -m bench.plans_bench [--plans 20] [--accounts 2000] [--rounds 3] [--changed 0.01]

Starts a redis-server and two Creditline servers on it (in this process), writes a
catalogue of `--plans` plans (the default plan's tariffs, each plan its own prices),
creates the accounts spread evenly over the plans through the first server, then runs
rounds of the load's flows (bench/workload.py: Initial, 3 Updates, Terminate, one SMS
event per account) through the second, which has seen none of them: the worst case, as a
worker of a deployment that did not create them. Between the last two rounds `--changed`
of the accounts change plan through the first server. Prints, per round, the requests, the
charging script calls (INFO commandstats: FCALL) and the share of requests that took a
second one. The goal (issue 17): <= 1 % in steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc
import uvloop
from creditline.api.app import start_server, stop_server
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.redis_process import RedisProcess
from creditline.v1 import admin_pb2 as admin_pb
from creditline.v1 import admin_pb2_grpc, charging_pb2_grpc
from redis.asyncio import Redis

from bench import redis_stats
from bench.workload import event_request, session_requests

FLOWS_AT_ONCE = 50


def catalogue_text(plans: int) -> str:
    """`plans` plans with the default plan's tariffs, plan n's prices (n + 1) times them."""
    tariffs = DEFAULT_PLAN_PATH.read_text().split("[[tariff]]", 1)[1]
    parts = ['[catalogue]\ndefault_plan = "p0"\n']
    for number in range(plans):
        scaled = "\n".join(_scaled(line, number + 1) for line in tariffs.splitlines())
        parts.append(f'[[plan]]\nid = "p{number}"\n[[plan.tariff]]'
                     + scaled.replace("[[tariff]]", "[[plan.tariff]]") + "\n")
    return "\n".join(parts)


def _scaled(line: str, factor: int) -> str:
    key, _, value = line.partition("=")
    if "price_micros" in key or "fee_micros" in key:
        return f"{key}= {int(value.split('#')[0].strip().replace('_', '')) * factor}"
    return line


async def _flows(charging: charging_pb2_grpc.ChargingStub, accounts: list[str],
                 round_number: int) -> int:
    async def flow(account_id: str) -> int:
        sent = 0
        for method, request in session_requests(f"{account_id};r{round_number}", account_id,
                                                3):
            await getattr(charging, method)(request)
            sent += 1
        await charging.Event(event_request(f"{account_id};e{round_number}", account_id))
        return sent + 1

    sent = 0
    for start in range(0, len(accounts), FLOWS_AT_ONCE):
        sent += sum(await asyncio.gather(*(flow(a) for a in accounts[start:start + FLOWS_AT_ONCE])))
    return sent


async def _script_calls(redis: Redis) -> int:
    """The charging script's calls so far: FCALLs (Redis 7: the admin script is an EVALSHA,
    so no other FCALL counts)."""
    return (await redis_stats.command_calls(redis)).get("fcall", 0)


async def run(plans: int, accounts: int, rounds: int, changed: float) -> None:
    with tempfile.TemporaryDirectory() as directory, RedisProcess() as process:
        path = Path(directory) / "catalogue.toml"
        path.write_text(catalogue_text(plans))
        settings = Settings(listen_address="127.0.0.1:0", plan_path=str(path))
        creating, charging_server = [await start_server(settings, process.url)
                                     for _ in range(2)]
        redis = Redis.from_url(process.url)
        if int((await redis.info("server"))["redis_version"].split(".")[0]) < 7:
            raise SystemExit("plans_bench counts FCALLs: it needs a redis-server 7 or newer "
                             "on PATH")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{creating.port}") as admin_channel, \
                    grpc.aio.insecure_channel(f"127.0.0.1:{charging_server.port}") as channel:
                admin = admin_pb2_grpc.AdminStub(admin_channel)
                names = [f"plans-{n}" for n in range(accounts)]
                for n, account_id in enumerate(names):
                    await admin.CreateAccount(admin_pb.CreateAccountRequest(
                        account_id=account_id, initial_balance_micros=10**13,
                        plan_id=f"p{n % plans}"))
                charging = charging_pb2_grpc.ChargingStub(channel)
                for number in range(1, rounds + 1):
                    if number == rounds and changed > 0:
                        moved = range(0, accounts, max(1, round(1 / changed)))
                        for n in moved:  # (account n is on plan n % plans: the next one)
                            await admin.ChangePlan(admin_pb.ChangePlanRequest(
                                account_id=names[n], plan_id=f"p{(n + 1) % plans}"))
                        print(f"  ({len(moved)} accounts changed plan)")
                    before = await _script_calls(redis)
                    requests = await _flows(charging, names, number)
                    calls = await _script_calls(redis) - before
                    print(f"round {number}: {requests:,} requests, {calls:,} script calls: "
                          f"{100 * (calls - requests) / requests:.2f} % took a second")
        finally:
            await redis.aclose()
            for server in (creating, charging_server):
                await stop_server(server, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plans_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--plans", type=int, default=20)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--changed", type=float, default=0.01,
                        help="share of the accounts changing plan before the last round")
    args = parser.parse_args()
    uvloop.run(run(args.plans, args.accounts, args.rounds, args.changed))


if __name__ == "__main__":
    main()
