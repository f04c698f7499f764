"""Wires the server from one Settings object: Redis, the plan, the rater, the servicers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from creditline.handlers import add_service
from creditline.notifications import READ_BLOCK_MS, EventHub, NotificationsService
from creditline.rating import IncrementRater, Plan, load_plan
from creditline.redis_process import RedisProcess
from creditline.service import AdminService, ChargingService
from creditline.settings import Settings
from creditline.store import RedisClient, Store, StoreConfig
from creditline.supervision import Supervisor
from creditline.v1 import admin_pb2, charging_pb2, notifications_pb2
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    redis: RedisClient
    plan: Plan
    store: Store
    hub: EventHub
    hub_redis: RedisClient
    supervisor: Supervisor


def redis_client(url: str, settings: Settings, max_connections: int = 0,
                 read_timeout_s: float = 0) -> RedisClient:
    if settings.redis_cluster:
        return RedisCluster.from_url(
            url, max_connections=max_connections or settings.redis_max_connections,
            socket_timeout=read_timeout_s or settings.redis_call_timeout_s,
            socket_connect_timeout=settings.redis_call_timeout_s)
    # BlockingConnectionPool waits for a free connection under load; the default pool
    # raises MaxConnectionsError instead (shared/reference/performance-floor.md).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections or settings.redis_max_connections,
        timeout=settings.redis_call_timeout_s,
        socket_timeout=read_timeout_s or settings.redis_call_timeout_s,
        socket_connect_timeout=settings.redis_call_timeout_s,
    )
    return Redis(connection_pool=pool)


def store_config(settings: Settings) -> StoreConfig:
    return StoreConfig(
        partitions=settings.partitions, answer_retention_s=settings.answer_retention_s,
        events_max_length=settings.events_max_length,
        events_retention_s=settings.events_retention_s,
        spike_fast_window_s=settings.spike_fast_window_s,
        spike_slow_window_s=settings.spike_slow_window_s, spike_factor=settings.spike_factor,
    )


async def start_server(settings: Settings, redis_url: str, reuse_port: bool = False
                       ) -> RunningServer:
    """Builds and starts the gRPC server; the caller stops it (stop_server)."""
    plan = load_plan(Path(settings.plan_path))
    redis = redis_client(redis_url, settings)
    store = Store(redis, store_config(settings))
    await store.check_partitions()
    server = grpc.aio.server(maximum_concurrent_rpcs=settings.max_concurrent_calls, options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # several worker processes share one port (SO_REUSEPORT); a lone server must not
        # silently share its port with a stale one
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ])
    add_service(server, ChargingService(store, plan, IncrementRater(), settings),
                charging_pb2.DESCRIPTOR.services_by_name["Charging"])
    add_service(server, AdminService(store, settings),
                admin_pb2.DESCRIPTOR.services_by_name["Admin"])
    # The hub's reader blocks in XREAD: it gets a connection of its own.
    hub_redis = redis_client(redis_url, settings, max_connections=settings.partitions + 2,
                             read_timeout_s=READ_BLOCK_MS / 1000 + settings.redis_call_timeout_s)
    hub = EventHub(hub_redis, settings.partitions)
    await hub.start()
    add_service(server, NotificationsService(
        hub, settings.subscriber_queue_size, settings.max_subscribers),
        notifications_pb2.DESCRIPTOR.services_by_name["Notifications"])
    supervisor = Supervisor(store, settings.supervision_interval_s, settings.supervision_batch)
    supervisor.start()
    port = server.add_insecure_port(settings.listen_address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.listen_address}")
    await server.start()
    return RunningServer(server=server, port=port, redis=redis, plan=plan, store=store,
                         hub=hub, hub_redis=hub_redis, supervisor=supervisor)


async def stop_server(running: RunningServer, grace_s: float) -> None:
    # The grace lets calls in flight finish: a script either ran whole or not at all,
    # but the client should get its answer rather than a cancelled call.
    await running.server.stop(grace_s)
    await running.supervisor.stop()
    await running.hub.stop()
    await running.hub_redis.aclose()
    await running.redis.aclose()


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
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


async def serve_with_redis(settings: Settings, redis_url: str, reuse_port: bool = False
                           ) -> None:
    """Runs one server process until SIGINT or SIGTERM."""
    running = await start_server(settings, redis_url, reuse_port)
    log.info("creditline listening on port %d (pid %d), plan %r with %d tariffs",
             running.port, os.getpid(), running.plan.name, len(running.plan.tariffs))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing calls in flight for up to %.1f s", settings.shutdown_grace_s)
    await stop_server(running, settings.shutdown_grace_s)
