"""CDR export throughput (issue 5): how fast `Exporter.drain()` loads CDRs into each sink.

For each sink in turn: a fresh redis-server database (FLUSHALL), --accounts accounts created
with the admin script, then --cdrs CDRs written by the real charging script (Event DEBIT of
one SMS each, called through creditline.store.store.Store without gRPC: each writes one CDR,
as in tests/test_cdrs.py::test_hundred_thousand_cdrs_exported_and_reconciled); then the
export is timed, and `reconcile` is run against the sink (0 discrepancies expected). Every
sink exports the same number of CDRs, generated the same way.

    python -m bench.cdr_bench --cdrs 50000

Sinks: SQLite (a file in a temporary directory), PostgreSQL (--postgres-url, in a schema
creditline_bench_<pid> dropped afterwards; skipped with --no-postgres) and JSON lines (a
temporary directory). Loopback only; writes bench/results/cdr-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from creditline.api.app import redis_client, store_config
from creditline.api.messages import block_plan
from creditline.books.cdr import open_sink
from creditline.books.exporter import Exporter
from creditline.books.reconcile import reconcile
from creditline.charging.kernels import select_kernels
from creditline.charging.rating import BandedRater, load_plan
from creditline.settings import DEFAULT_PLAN_PATH, Settings
from creditline.store.contract import EventAction, RequestKind
from creditline.store.redis_process import RedisProcess
from creditline.store.store import MAX_BUCKETS_PER_ACCOUNT, Store
from creditline.store.transport import RedisPy
from creditline.v1 import charging_pb2 as pb
from redis import Redis as SyncRedis

log = logging.getLogger("bench.cdr")
ROOT = Path(__file__).resolve().parent.parent
RG_SMS = 300
# Script calls in flight while the CDRs are written: within the client's connection pool.
GENERATE_CONCURRENCY = 100
MAX_CDRS = 2_000_000
DEFAULT_PLAN = DEFAULT_PLAN_PATH
PLAN_ID = "default"  # DEFAULT_PLAN's plan (its name): the accounts' plan
ACCOUNT_BALANCE_MICROS = 10**12


async def generate(redis_url: str, accounts: int, cdrs: int) -> dict[str, Any]:
    """FLUSHALL, then the accounts and the CDRs; returns how long that took."""
    settings = replace(Settings(), redis_call_timeout_s=60)
    redis = redis_client(redis_url, settings)
    try:
        await redis.flushall()
        store = Store(RedisPy(redis), store_config(settings))
        await store.prepare()
        names = [f"cdrbench-{n:05d}" for n in range(accounts)]
        for start in range(0, accounts, GENERATE_CONCURRENCY):
            answers = await asyncio.gather(*(
                store.admin(name, "CREATE", ACCOUNT_BALANCE_MICROS, 0,
                            MAX_BUCKETS_PER_ACCOUNT, "", PLAN_ID)
                for name in names[start:start + GENERATE_CONCURRENCY]))
            if any(answer.status == "EXISTS" for answer in answers):
                raise RuntimeError("an account existed after FLUSHALL")
        now_ms = int(time.time() * 1000)
        # one Event DEBIT of one SMS: the charging script's arguments, as the server
        # builds them; one CDR per call
        sms_blocks = block_plan(select_kernels(), load_plan(DEFAULT_PLAN),
                                BandedRater()).script_blocks(
            [pb.RatingGroupRequest(rating_group=RG_SMS,
                                   requested=pb.Units(service_specific_units=1))],
            now_ms, default_grant=False)
        started = time.perf_counter()
        for start in range(0, cdrs, GENERATE_CONCURRENCY):
            await asyncio.gather(*(
                store.charge(RequestKind.EVENT, names[n % accounts], f"cdrbench-ev{n}", 0, now_ms,
                             now_ms, EventAction.DEBIT, sms_blocks)
                for n in range(start, min(cdrs, start + GENERATE_CONCURRENCY))))
        elapsed = time.perf_counter() - started
        return {"generate_s": round(elapsed, 2), "generate_per_s": round(cdrs / elapsed, 1),
                "partitions": settings.partitions}
    finally:
        await redis.aclose()


def export_and_reconcile(redis_url: str, partitions: int, url: str, expected: int
                         ) -> dict[str, Any]:
    redis = SyncRedis.from_url(redis_url)
    sink = open_sink(url)
    try:
        exporter = Exporter(redis, partitions, sink)
        backlog = exporter.backlog()
        if backlog != expected:
            raise RuntimeError(f"backlog {backlog} CDRs, expected {expected}")
        started = time.perf_counter()
        exported = exporter.drain()
        export_s = time.perf_counter() - started
        stored = sink.count()
        started = time.perf_counter()
        checked, problems = reconcile(redis, partitions, sink)
        reconcile_s = time.perf_counter() - started
    finally:
        sink.close()
        redis.close()
    for problem in problems[:10]:
        log.error("  discrepancy: %s", problem)
    return {
        "exported": exported, "stored_in_sink": stored, "export_s": round(export_s, 3),
        "cdrs_per_s": round(exported / export_s, 1) if export_s else None,
        "reconcile_accounts_checked": checked, "reconcile_discrepancies": len(problems),
        "reconcile_s": round(reconcile_s, 2),
    }


def drop_schema(postgres_url: str, schema: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    schema = f"creditline_bench_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="creditline-cdr-bench-") as tmp, \
            RedisProcess() as redis_process:
        sinks = {"sqlite": f"sqlite:///{Path(tmp) / 'cdrs.sqlite'}"}
        if not args.no_postgres:
            sinks["postgres"] = f"{args.postgres_url}?schema={schema}"
        sinks["jsonl"] = f"jsonl:///{Path(tmp) / 'jsonl'}"
        try:
            for name, url in sinks.items():
                load = [round(x, 2) for x in os.getloadavg()]
                log.info("%s: writing %d CDRs on %d accounts (load %s)", name, args.cdrs,
                         args.accounts, load)
                generated = asyncio.run(generate(redis_process.url, args.accounts, args.cdrs))
                log.info("  written in %.1f s (%.0f/s); exporting", generated["generate_s"],
                         generated["generate_per_s"])
                exported = export_and_reconcile(redis_process.url, generated["partitions"],
                                                url, args.cdrs)
                results[name] = {"load_average_before": load, **generated, **exported}
                log.info("  %s: %d CDRs exported in %.2f s: %.0f CDRs/s; reconcile: %d "
                         "accounts, %d discrepancies", name, exported["exported"],
                         exported["export_s"], exported["cdrs_per_s"] or 0,
                         exported["reconcile_accounts_checked"],
                         exported["reconcile_discrepancies"])
        finally:
            if not args.no_postgres:
                drop_schema(args.postgres_url, schema)
    return results


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cdr_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cdrs", type=int, default=50_000, help="CDRs per sink (default "
                        "50000)")
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "CREDITLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1/test"))
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if not 1 <= args.cdrs <= MAX_CDRS or not 1 <= args.accounts <= args.cdrs:
        parser.error(f"--cdrs: 1..{MAX_CDRS}; --accounts: 1..--cdrs")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_arguments(argv)
    started_at = datetime.datetime.now(datetime.UTC)
    load = [round(x, 2) for x in os.getloadavg()]
    sinks = run(args)
    results = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.cdr_bench", *sys.argv[1:]]),
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "cdrs_per_sink": args.cdrs, "accounts": args.accounts, "sinks": sinks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cdr-{started_at.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'sink':<10} {'CDRs':>8} {'export s':>9} {'CDRs/s':>9} {'discrepancies':>14}")
    for name, figures in sinks.items():
        print(f"{name:<10} {figures['exported']:>8} {figures['export_s']:>9.2f} "
              f"{figures['cdrs_per_s'] or 0:>9.0f} {figures['reconcile_discrepancies']:>14}")
    print(f"results: {path}")
    failed = any(f["reconcile_discrepancies"] or f["exported"] != args.cdrs
                 for f in sinks.values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
