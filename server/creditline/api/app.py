"""Wires the server from one Settings object: Redis, the plan, the rater, the servicers,
notifications, supervision, health and reflection, TLS and roles, traces and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from creditline.api import security
from creditline.api.handlers import add_service
from creditline.api.interceptors import CallWrapper
from creditline.api.notifications import NotificationsService
from creditline.api.service import AdminService, ChargingService
from creditline.charging.catalogue import Catalogue, PlansSeen, load_catalogue
from creditline.charging.kernels import require_kernels
from creditline.charging.rating import BandedRater
from creditline.charging.renewal import Renewer
from creditline.clock import Clock
from creditline.diameter.node import DiameterNode
from creditline.errors import PlanError, RedisSetupError, SettingsError
from creditline.events.hub import READ_BLOCK_MS, EventHub
from creditline.observability.telemetry import Telemetry, build_telemetry
from creditline.settings import Settings, check_files, redact_url, redis_password
from creditline.store.contract import NEXT_PLAN_FIELD, PLAN_FIELD, SUBSCRIPTION_ID_TYPES
from creditline.store.fastredis import FastScriptClient, tls_context
from creditline.store.redis_process import RedisProcess
from creditline.store.store import (
    RedisClient,
    Store,
    StoreConfig,
    account_keys,
    accounts_key,
    cdrs_key,
    text,
)
from creditline.store.supervision import Supervisor
from creditline.store.transport import LeanCluster, RedisPy, Transport
from creditline.v1 import admin_pb2, charging_pb2, notifications_pb2

log = logging.getLogger(__name__)

CHARGING = charging_pb2.DESCRIPTOR.services_by_name["Charging"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
NOTIFICATIONS = notifications_pb2.DESCRIPTOR.services_by_name["Notifications"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
CHARGING_SERVICE = CHARGING.full_name
ADMIN_SERVICE = ADMIN.full_name


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    redis: RedisClient
    store: Store
    transport: Transport
    hub: EventHub
    supervisor: Supervisor
    renewer: Renewer
    health: Any  # grpc_health's aio HealthServicer (untyped)
    telemetry: Telemetry
    charging: ChargingService
    admin: AdminService
    plan_path: Path  # the catalogue's file, read again by a reload (SIGHUP)
    diameter: DiameterNode | None = None  # the Gy listener (diameter_listen)

    @property
    def catalogue(self) -> Catalogue:
        """The catalogue served now (a reload changes it)."""
        return self.admin.catalogue


def _redis_options(url: str, settings: Settings) -> dict[str, Any]:
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
    return options


def redis_client(url: str, settings: Settings, max_connections: int = 0,
                 read_timeout_s: float = 0, protocol: int = 0) -> RedisClient:
    """protocol: 2 for RESP2 (the transport's shape); 0: redis-py's default (RESP3 where
    the server speaks it, in redis-py 8)."""
    options = _redis_options(url, settings)
    if protocol:
        options["protocol"] = protocol
    if settings.redis_cluster:
        return RedisCluster.from_url(
            url, max_connections=max_connections or settings.redis_max_connections,
            socket_timeout=read_timeout_s or settings.redis_call_timeout_s,
            socket_connect_timeout=settings.redis_call_timeout_s, **options)
    # BlockingConnectionPool waits for a free connection under load; the default pool
    # raises MaxConnectionsError instead (bench/README.md).
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections or settings.redis_max_connections,
        timeout=settings.redis_call_timeout_s,
        socket_timeout=read_timeout_s or settings.redis_call_timeout_s,
        socket_connect_timeout=settings.redis_call_timeout_s,
        **options,
    )
    return Redis(connection_pool=pool)


# The charging script reads hashes as RESP3 maps (redis.setresp: 6.0) and streams are
# trimmed by age with MINID (6.2).
MIN_REDIS_VERSION = (6, 2)
# A session id's claim with no session behind it is taken over after this many call
# deadlines (redis_call_timeout_s): by then its account's Initial has run or failed.
CLAIM_GRACE_CALLS = 5


async def check_redis(redis: RedisClient, url: str, timeout_s: float) -> None:
    """One PING and the server's version at start: a wrong address, password or TLS set-up,
    or a Redis too old for the scripts, is said at once (the URL's password masked)
    instead of as 5012 on every call."""
    try:
        await asyncio.wait_for(redis.ping(), timeout_s)
        info = await asyncio.wait_for(info_of_every_node(redis), timeout_s)
    except (TimeoutError, RedisError, OSError) as error:
        raise RedisSetupError(f"cannot use Redis at {redact_url(url)}: "
                              f"{type(error).__name__}: {error}") from None
    for version in redis_versions(info):
        if version_tuple(version) < MIN_REDIS_VERSION:
            raise RedisSetupError(
                f"Redis at {redact_url(url)} is version {version}: Creditline needs "
                f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer")


async def info_of_every_node(redis: RedisClient) -> Mapping[str, Any]:
    """INFO server of one Redis, or of every node of a cluster (by node name)."""
    if isinstance(redis, RedisCluster):
        by_node: Mapping[str, Any] = await redis.info(
            "server", target_nodes=RedisCluster.ALL_NODES)
        return by_node
    info: Mapping[str, Any] = await redis.info("server")
    return info


def redis_versions(info: Mapping[str, Any]) -> list[str]:
    """The redis_version of INFO server: one server's, or each node's of a cluster (which
    redis-py gives per node)."""
    if "redis_version" in info:
        return [str(info["redis_version"])]
    return [str(node["redis_version"]) for node in info.values()
            if isinstance(node, Mapping) and "redis_version" in node]


def version_tuple(version: str) -> tuple[int, ...]:
    """'7.0.15' -> (7, 0, 15); a part that is not a number ends it ('7.2-rc1' -> (7,))."""
    numbers = []
    for part in version.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def transport_for(redis_url: str, settings: Settings, *, blocking: bool = False
                  ) -> Transport:
    """The one choice of Redis client, from the settings: the lean path (one server, or a
    cluster by slot) where it applies, else redis-py; with the same credentials and TLS
    files either way. blocking: for the hub's readers (XREAD BLOCK): a call may take the
    block time more, and redis-py needs only a connection or two."""
    call_timeout_s = settings.redis_call_timeout_s + (READ_BLOCK_MS / 1000 if blocking else 0)
    if not (settings.redis_fast_path and FastScriptClient.usable_for(
            redis_url, settings.redis_cluster)):
        return RedisPy(redis_client(redis_url, settings, max_connections=2 if blocking else 0,
                                    read_timeout_s=call_timeout_s, protocol=2))
    tls = None
    if redis_url.startswith("rediss://"):
        tls = tls_context(settings.redis_tls_ca_file, settings.redis_tls_cert_file,
                          settings.redis_tls_key_file)
    lean = LeanCluster if settings.redis_cluster else FastScriptClient
    return lean(redis_url, settings.redis_call_timeout_s, call_timeout_s,
                username=settings.redis_username, password=redis_password(settings), tls=tls)


def store_config(settings: Settings) -> StoreConfig:
    return StoreConfig(
        partitions=settings.partitions, answer_retention_s=settings.answer_retention_s,
        events_max_length=settings.events_max_length,
        events_retention_s=settings.events_retention_s,
        spike_fast_window_s=settings.spike_fast_window_s,
        spike_slow_window_s=settings.spike_slow_window_s, spike_factor=settings.spike_factor,
        # past every deadline of the holder's Initial: the pool's wait, then the reply's
        claim_grace_ms=int(settings.redis_call_timeout_s * 1000 * CLAIM_GRACE_CALLS),
        session_id_claims=settings.session_id_claims,
    )


def _call_wrapper(settings: Settings, telemetry: Telemetry) -> CallWrapper | None:
    # No wrapper at all when nothing needs one: the plain call path stays as fast as it
    # was (no wrapper, no span, no clock read).
    if not (settings.mutual_tls or telemetry.enabled):
        return None
    return CallWrapper(tracer=telemetry.tracer, metrics=telemetry.metrics,
                       check_roles=settings.mutual_tls, roots=telemetry.root_sampling)


def _grpc_server(settings: Settings, reuse_port: bool) -> grpc.aio.Server:
    return grpc.aio.server(
        maximum_concurrent_rpcs=settings.max_concurrent_calls,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            # several worker processes share one port (SO_REUSEPORT); a lone server must
            # not silently share its port with a stale one
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ])


async def _event_hub(redis_url: str, settings: Settings, transport: Transport) -> EventHub:
    # The hub's readers block in XREAD: each gets a transport of its own.
    hub = EventHub(transport, settings.partitions, read_together=not transport.cluster,
                   reader=functools.partial(transport_for, redis_url, settings, blocking=True))
    await hub.start()
    return hub


async def start_server(settings: Settings, redis_url: str, telemetry: Telemetry | None = None,
                       environ: Mapping[str, str] = os.environ, *, reuse_port: bool = False,
                       ) -> RunningServer:
    """Builds and starts the gRPC server; the caller stops it (stop_server). Telemetry is
    built from the settings and OTEL_* variables unless given (tests give in-memory ones)."""
    check_files(settings)
    kernels = require_kernels()  # refuses the pure path unless allowed
    log.info("rating kernels: %s", kernels.implementation)
    catalogue = load_catalogue(Path(settings.plan_path))
    credentials = security.server_credentials(settings)
    telemetry = telemetry or build_telemetry(settings, environ)
    redis = redis_client(redis_url, settings)
    transport = transport_for(redis_url, settings)  # (it connects at its first call)
    store = Store(transport, store_config(settings), telemetry.script_instrument(),
                  Clock(settings.clock_offset_s * 1000))
    try:
        await check_redis(redis, redis_url, settings.redis_call_timeout_s)
        await store.prepare()
    except ValueError:
        await transport.aclose()
        await redis.aclose()
        await telemetry.shutdown()
        raise
    server = _grpc_server(settings, reuse_port)
    wrapper = _call_wrapper(settings, telemetry)
    wrap = None if wrapper is None else wrapper.wrap
    rater = telemetry.traced_rater(BandedRater())
    plans_seen = PlansSeen(settings.max_remembered_account_plans)
    charging = ChargingService(
        store, catalogue, rater, settings, charge_calls_bounded=transport.bounded,
        plans_seen=plans_seen, stream_request=None if wrapper is None else wrapper.stream_request)
    admin = AdminService(store, settings, catalogue, plans_seen=plans_seen)
    add_service(server, charging, CHARGING, wrap)
    add_service(server, admin, ADMIN, wrap)
    hub = await _event_hub(redis_url, settings, transport)
    add_service(server, NotificationsService(
        hub, settings.subscriber_queue_size, settings.max_subscribers, telemetry.metrics,
        settings.subscriber_batch_linger_s),
        NOTIFICATIONS, wrap)
    # (health.aio and reflection.aio: the packages' public asyncio servicers, which the
    # type stubs do not list)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [CHARGING_SERVICE, ADMIN_SERVICE, NOTIFICATIONS.full_name, health.SERVICE_NAME]
    if settings.reflection_enabled:
        # through the wrapper: with mutual TLS only callers with a role may list and
        # describe the services (reflection.enable_server_reflection would open it to all)
        add_service(server, reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
            [*services, reflection.SERVICE_NAME]), REFLECTION, wrap)
    supervisor = Supervisor(store, settings.supervision_interval_s, settings.supervision_batch)
    renewer = Renewer(store, store.config.partitions, lambda: admin.catalogue,
                      settings.renewal_interval_s, settings.renewal_batch)
    if credentials is None:
        port = server.add_insecure_port(settings.listen_address)
    else:
        port = server.add_secure_port(settings.listen_address, credentials)
    if port == 0:
        await _release(hub, transport, redis, telemetry)
        raise SettingsError(f"setting listen_address: cannot listen on {settings.listen_address}")
    # what fell due while no process ran (a restart at a period's end) is renewed before
    # the first request: one pass, at most renewal_batch per partition
    await renewer.sweep_logged()
    await server.start()
    try:
        diameter = await _diameter_node(settings, charging, store, hub, wrapper)
    except ValueError:  # (a Diameter listener that cannot be: what runs already stops)
        await server.stop(0)
        await _release(hub, transport, redis, telemetry)
        raise
    supervisor.start()
    renewer.start()
    for service in ("", CHARGING_SERVICE, ADMIN_SERVICE, NOTIFICATIONS.full_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if telemetry.metrics is not None:  # (what the observable instruments read)
        telemetry.metrics.hub_lag_source = hub.lag
        telemetry.metrics.closures_source = lambda: supervisor.closed
    telemetry.start_account_gauge(redis, settings.metrics_accounts_interval_s,
                                  [cdrs_key(p) for p in range(settings.partitions)],
                                  [accounts_key(p) for p in range(settings.partitions)])
    return RunningServer(server=server, port=port, redis=redis, store=store,
                         transport=transport, hub=hub, supervisor=supervisor,
                         renewer=renewer,
                         health=health_servicer, telemetry=telemetry, charging=charging,
                         admin=admin, plan_path=Path(settings.plan_path), diameter=diameter)


async def _release(hub: EventHub, transport: Transport, redis: RedisClient,
                   telemetry: Telemetry) -> None:
    """What a start that fails has opened, closed: said once, not in __del__ tracebacks."""
    await hub.stop()
    await transport.aclose()
    await redis.aclose()
    await telemetry.shutdown()


async def _diameter_node(settings: Settings, charging: ChargingService, store: Store,
                         hub: EventHub, wrapper: CallWrapper | None) -> DiameterNode | None:
    """The Diameter Gy listener when diameter_listen names one."""
    if not settings.diameter_listen:
        return None

    async def identities(subscription_id_type: int, data: str) -> str | None:
        kind = SUBSCRIPTION_ID_TYPES.get(subscription_id_type)
        if kind is None:
            return None
        try:
            return await store.identity_account(kind, data)
        except ValueError:  # (data no identity of that kind can hold: bound to none)
            return None

    node = DiameterNode(settings, charging, identities, hub,
                        None if wrapper is None else wrapper.diameter_request)
    await node.start()
    return node


async def stop_server(running: RunningServer, grace_s: float) -> None:
    # Health says NOT_SERVING first, so balancers stop sending; then the server takes no
    # new calls and gives those in flight the grace to finish. A charge is one atomic
    # script: a call cut at the end of the grace was applied whole or not at all, and its
    # retransmission gets the stored answer. Redis closes only after the last call.
    await running.health.enter_graceful_shutdown()
    if running.diameter is not None:  # (its peers told first: DPR, then they go)
        await running.diameter.stop()
    await running.server.stop(grace_s)
    await running.supervisor.stop()
    await running.renewer.stop()
    await running.hub.stop()
    await running.transport.aclose()
    await running.telemetry.shutdown()
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
    # private: a unix socket in a 0700 directory, no TCP (it has no password)
    process = RedisProcess(data_dir=settings.embedded_redis_dir, extra_args=extra,
                           die_with_parent=True, private=True)
    process.start()
    log.info("started embedded redis-server %s on %s (data in %s)",
             process.binary, process.url, process.data_dir)
    try:
        yield process.url
    finally:
        process.stop()


def freeze_startup_objects() -> None:
    """Moves everything made so far (modules, plan, server, clients: alive as long as the
    process) out of the garbage collector's reach. Why: a full collection scanned them
    all and paused the event loop ~20 ms each time (measured with gc callbacks under
    notify_bench), the tail of every call's latency; frozen, a full pass scans only what
    the calls made since."""
    gc.collect()
    gc.freeze()


# catalogue_in_use's count of the accounts with no plan of their own (made before plans: they
# follow the default plan)
NO_PLAN = ""


async def catalogue_in_use(redis: RedisClient, partitions: int
                           ) -> tuple[Counter[str], Counter[str]]:
    """How many accounts are on each plan or have a change to it scheduled (under NO_PLAN
    those with no plan of their own), and how many subscribe to each recurring offer: one
    scan of the accounts, one HMGET and one HKEYS each."""
    plans: Counter[str] = Counter()
    offers: Counter[str] = Counter()
    for partition in range(partitions):
        async for member in redis.sscan_iter(accounts_key(partition), count=1000):
            keys = account_keys(text(member), partitions)
            plan, next_plan = await redis.hmget(keys.account, PLAN_FIELD, NEXT_PLAN_FIELD)
            plans[text(plan) if plan else NO_PLAN] += 1
            if next_plan and next_plan != plan:
                plans[text(next_plan)] += 1
            offers.update(text(offer_id) for offer_id in await redis.hkeys(keys.subscriptions))
    return plans, offers


async def reload_catalogue(running: RunningServer, partitions: int) -> str:
    """Reads the catalogue file again and serves it from the next request on; refused
    (the old one kept) when it cannot be read or checked, or when a plan or a recurring
    offer it drops (or the default it changes) is still some account's. Returns what
    happened, for the log."""
    old = running.catalogue
    try:
        new = load_catalogue(running.plan_path)
    except PlanError as error:
        raise PlanError(f"catalogue reload refused, version {old.version} kept: {error}") \
            from None
    plans, offers = await catalogue_in_use(running.redis, partitions)
    users = {f"plan {plan_id!r}": plans[plan_id] for plan_id in set(old.plans) - set(new.plans)
             if plans[plan_id]}
    if plans[NO_PLAN] and new.default_plan_id != old.default_plan_id:
        # (accounts with no plan of their own would move to the new default)
        users[f"plan {old.default_plan_id!r} (the default)"] = plans[NO_PLAN]
    users.update({f"offer {offer_id!r}": count for offer_id, count in offers.items()
                  if not (offer_id in new.offers and new.offers[offer_id].recurring)})
    if users:
        named = ", ".join(f"{what} by {count} account(s)" for what, count in
                          sorted(users.items()))
        raise PlanError(f"catalogue reload refused, version {old.version} kept: it drops "
                        f"what is still in use: {named} (ChangePlan or CancelSubscription "
                        "them first)")
    running.charging.use_catalogue(new)
    running.admin.use_catalogue(new)
    return f"catalogue reloaded: version {old.version} -> {new.version}, {len(new.plans)} " \
           f"plan(s), {len(new.offers)} offer(s)"


async def _reload_on_signal(running: RunningServer, partitions: int) -> None:
    try:
        log.info("%s", await reload_catalogue(running, partitions))
    except (PlanError, RedisError, OSError) as error:
        log.error("%s", error)


async def serve_with_redis(settings: Settings, redis_url: str, reuse_port: bool = False
                           ) -> None:
    """Runs one server process until SIGINT or SIGTERM."""
    running = await start_server(settings, redis_url, reuse_port=reuse_port)
    freeze_startup_objects()
    telemetry = running.telemetry
    log.info("creditline listening on port %d (pid %d, %s), %d plan(s), the default %r "
             "with %d tariffs; "
             "tracing %s, metrics %s", running.port, os.getpid(),
             "mutual TLS" if settings.mutual_tls else
             "TLS" if settings.tls_enabled else "insecure",
             len(running.catalogue.plans), running.catalogue.default_plan_id,
             len(running.catalogue.default_plan.tariffs),
             "on" if telemetry.tracer else "off",
             f"on (prometheus port {telemetry.prometheus_port})"
             if telemetry.prometheus_port else "on" if telemetry.metrics else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:  # SIGHUP: the catalogue file again
        task = asyncio.ensure_future(_reload_on_signal(running, settings.partitions))
        reloads.add(task)
        task.add_done_callback(reloads.discard)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    log.info("stopping: finishing calls in flight for up to %.1f s", settings.shutdown_grace_s)
    await stop_server(running, settings.shutdown_grace_s)
    log.info("stopped")
