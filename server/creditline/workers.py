"""`creditline serve`: one process, or N worker processes sharing the port.

gRPC in Python runs one event loop per process (about 5.5k unary calls/s per core here,
bench/README.md): more cores need more processes. Workers share the
listen port through SO_REUSEPORT, so the kernel spreads connections over them; they
share nothing else but Redis, where every charge is atomic.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from dataclasses import replace
from types import FrameType

import uvloop

from creditline.api.app import redis_for, serve_with_redis
from creditline.errors import SettingsError
from creditline.observability.logging_setup import configure_logging
from creditline.settings import Settings, risks

log = logging.getLogger(__name__)
# How long the parent waits for its workers to stop after passing on SIGTERM.
WORKER_STOP_TIMEOUT_S = 30.0


def worker_count(settings: Settings) -> int:
    return settings.workers or os.cpu_count() or 1


def worker_metrics_address(address: str, worker: int) -> str:
    """Worker `worker`'s Prometheus endpoint: the port of metrics_listen_address plus the
    worker's number (0, 1, ...), each worker's own. Why not one endpoint for all: the
    workers share nothing, and OTel's Prometheus reader serves one process's instruments
    (prometheus_client's multiprocess mode is for its own instruments); a scrape config
    lists the ports, each scrape one worker's whole story. Port 0: each its own free one
    (its log line says which)."""
    if not address:
        return address
    host, _, port = address.rpartition(":")
    return address if port == "0" else f"{host}:{int(port) + worker}"


def _worker_main(settings: Settings, redis_url: str) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a reload asked before the worker runs)
    configure_logging(settings.log_format, settings.log_level)
    try:
        uvloop.run(serve_with_redis(settings, redis_url, reuse_port=True))
    except ValueError as error:  # a setting that cannot work: said once, plainly
        print(f"creditline: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(settings: Settings) -> int:
    """Runs the server until SIGINT or SIGTERM (SIGHUP: the catalogue reloaded); returns
    the exit code."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (until serving: a reload, not a hang-up)
    for risk in risks(settings):  # once, here: not again in every worker
        log.warning("%s", risk)
    workers = worker_count(settings)
    with redis_for(settings) as redis_url:
        if workers == 1:
            uvloop.run(serve_with_redis(settings, redis_url))
            return 0
        if settings.listen_address.endswith(":0"):
            raise SettingsError("setting listen_address: workers need a fixed port to share")
        context = multiprocessing.get_context("spawn")
        processes = [
            context.Process(target=_worker_main, name=f"creditline-worker-{n}",
                            args=(replace(settings, redis_url=redis_url,
                                          metrics_listen_address=worker_metrics_address(
                                              settings.metrics_listen_address, n)),
                                  redis_url))
            for n in range(workers)
        ]
        for process in processes:
            process.start()
        log.info("started %d workers on %s", workers, settings.listen_address)
        if settings.metrics_listen_address:
            log.info("metrics: worker n serves its own on %s (port + n)",
                     settings.metrics_listen_address)

        def pass_on(signum: int, frame: FrameType | None) -> None:
            # a stop (SIGTERM, SIGINT) stops every worker; SIGHUP makes each reload the
            # catalogue (each says in its log what came of it)
            passed = signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM
            for process in processes:
                if process.is_alive() and process.pid:
                    os.kill(process.pid, passed)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, pass_on)
        for process in processes:
            process.join()
        return max((p.exitcode or 0) for p in processes)
