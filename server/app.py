"""Wires the server from one Settings object: Redis, the plan, the rater, the servicers,
health and reflection, TLS and roles, traces and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from creditline import security
from creditline.interceptors import CallInterceptor
from creditline.rating import IncrementRater, Plan, load_plan
from creditline.redis_process import RedisProcess
from creditline.service import AdminService, ChargingService
from creditline.settings import Settings, check_files, redact_url, redis_password
from creditline.store import Store
from creditline.telemetry import Telemetry, build_telemetry
from creditline.v1 import admin_pb2, admin_pb2_grpc, charging_pb2, charging_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

CHARGING_SERVICE = charging_pb2.DESCRIPTOR.services_by_name["Charging"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    redis: Redis
    plan: Plan
    health: Any  # grpc_health's aio HealthServicer (untyped)
    telemetry: Telemetry


def redis_client(url: str, settings: Settings) -> Redis:
    # BlockingConnectionPool waits for a free connection under load; the default pool
    # raises MaxConnectionsError instead (shared/reference/performance-floor.md).
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    password = redis_password(settings)
    if password:
        options["password"] = password
    if url.startswith("rediss://"):
        if settings.redis_tls_ca_file:
            options["ssl_ca_certs"] = settings.redis_tls_ca_file
        if settings.redis_tls_cert_file:
            options["ssl_certfile"] = settings.redis_tls_cert_file
            options["ssl_keyfile"] = settings.redis_tls_key_file
    pool = BlockingConnectionPool.from_url(
        url, max_connections=settings.redis_max_connections,
        timeout=settings.redis_call_timeout_s,
        socket_timeout=settings.redis_call_timeout_s,
        socket_connect_timeout=settings.redis_call_timeout_s,
        **options,
    )
    return Redis(connection_pool=pool)


async def check_redis(redis: Redis, url: str, timeout_s: float) -> None:
    """One PING at start: a wrong address, password or TLS set-up is said at once, with
    the URL's password masked, instead of as 5012 on every call."""
    try:
        await asyncio.wait_for(redis.ping(), timeout_s)
    except (TimeoutError, RedisError, OSError) as error:
        raise ValueError(f"cannot use Redis at {redact_url(url)}: "
                         f"{type(error).__name__}: {error}") from None


def _interceptors(settings: Settings, telemetry: Telemetry) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    # No interceptor at all when nothing needs one: the plain call path stays as fast as
    # it was (no wrapper, no span, no clock read).
    if not (settings.mutual_tls or telemetry.enabled):
        return []
    return [CallInterceptor(spans=telemetry.spans, metrics=telemetry.metrics,
                            check_roles=settings.mutual_tls)]


async def start_server(settings: Settings, redis_url: str, telemetry: Telemetry | None = None,
                       environ: Mapping[str, str] = os.environ) -> RunningServer:
    """Builds and starts the gRPC server; the caller stops it (stop_server). Telemetry is
    built from the settings and OTEL_* variables unless given (tests give in-memory ones)."""
    check_files(settings)
    plan = load_plan(Path(settings.plan_path))
    credentials = security.server_credentials(settings)
    telemetry = telemetry or build_telemetry(settings, environ)
    redis = redis_client(redis_url, settings)
    try:
        await check_redis(redis, redis_url, settings.redis_call_timeout_s)
    except ValueError:
        await redis.aclose()
        await telemetry.shutdown()
        raise
    store = Store(redis, settings.answer_retention_s, telemetry.script_instrument())
    server = grpc.aio.server(
        interceptors=_interceptors(settings, telemetry),
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
    charging_pb2_grpc.add_ChargingServicer_to_server(
        ChargingService(store, plan, telemetry.traced_rater(IncrementRater()), settings),
        server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(store, settings), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [CHARGING_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME]
    if settings.reflection_enabled:
        reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
    if credentials is None:
        port = server.add_insecure_port(settings.listen_address)
    else:
        port = server.add_secure_port(settings.listen_address, credentials)
    if port == 0:
        await redis.aclose()
        await telemetry.shutdown()
        raise ValueError(f"setting listen_address: cannot listen on {settings.listen_address}")
    await server.start()
    for service in ("", CHARGING_SERVICE, ADMIN_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    telemetry.start_account_gauge(redis, settings.metrics_accounts_interval_s)
    return RunningServer(server=server, port=port, redis=redis, plan=plan,
                         health=health_servicer, telemetry=telemetry)


async def stop_server(running: RunningServer, grace_s: float) -> None:
    # Health says NOT_SERVING first, so balancers stop sending; then the server takes no
    # new calls and gives those in flight the grace to finish. A charge is one atomic
    # script: a call cut at the end of the grace was applied whole or not at all, and its
    # retransmission gets the stored answer. Redis closes only after the last call.
    await running.health.enter_graceful_shutdown()
    await running.server.stop(grace_s)
    await running.telemetry.shutdown()
    await running.redis.aclose()


@contextlib.asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[str]:
    """The Redis URL to use: the configured one, or an embedded redis-server for the run."""
    if settings.redis_url:
        yield settings.redis_url
        return
    extra: tuple[str, ...] = ()
    if settings.embedded_redis_dir:
        extra = ("--appendonly", "yes", "--appendfsync", "always")
    process = RedisProcess(data_dir=settings.embedded_redis_dir, extra_args=extra)
    process.start()
    log.info("started embedded redis-server %s on %s (data in %s)",
             process.binary, process.url, process.data_dir)
    try:
        yield process.url
    finally:
        process.stop()


async def serve(settings: Settings) -> None:
    async with redis_for(settings) as url:
        running = await start_server(settings, url)
        telemetry = running.telemetry
        log.info("creditline listening on port %d (%s), plan %r with %d tariffs; tracing %s, "
                 "metrics %s", running.port,
                 "mutual TLS" if settings.mutual_tls else
                 "TLS" if settings.tls_enabled else "insecure",
                 running.plan.name, len(running.plan.tariffs),
                 "on" if telemetry.tracer else "off",
                 f"on (prometheus port {telemetry.prometheus_port})"
                 if telemetry.prometheus_port else "on" if telemetry.metrics else "off")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: finishing calls in flight for up to %.1f s",
                 settings.shutdown_grace_s)
        await stop_server(running, settings.shutdown_grace_s)
        log.info("stopped")
