"""One typed settings object for the server, from flags and environment variables.

Every limit is named here with its unit; `creditline serve --help` lists them all.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_PLAN_PATH = Path(__file__).resolve().parent / "plans" / "default.toml"
ENV_PREFIX = "CREDITLINE_"


@dataclass(frozen=True, slots=True)
class Settings:
    # where the gRPC server listens
    listen_address: str = "127.0.0.1:50051"
    # server processes sharing the port (SO_REUSEPORT); 0: one per core
    workers: int = 0
    # Redis URL (redis://, rediss://, unix://); empty: start an embedded redis-server
    redis_url: str = ""
    # the Redis URL names one node of a Redis Cluster
    redis_cluster: bool = False
    # directory for the embedded redis-server's data; empty: a temporary directory
    embedded_redis_dir: str = ""
    # the TOML plan file with the tariffs
    plan_path: str = str(DEFAULT_PLAN_PATH)
    # how long a closed session's or an event's answer is kept for retransmissions
    answer_retention_s: int = 600
    # accounts are spread over this many partitions (hash tags); each has its own
    # notification and CDR stream. Fixed once a Redis holds data.
    partitions: int = 16
    # notifications kept per partition stream: by length, or by age when > 0
    events_max_length: int = 100_000
    events_retention_s: int = 0
    # usage spike: the rate over the fast window above `factor` x the slow window's
    spike_fast_window_s: int = 300
    spike_slow_window_s: int = 86_400
    spike_factor: float = 20.0
    # stale sessions: closed after supervision_factor x the validity time with no request;
    # every process sweeps every sweep interval, closing at most `batch` per partition
    supervision_factor: float = 2.0
    supervision_interval_s: float = 1.0
    supervision_batch: int = 100
    # notification subscribers: events queued per subscriber before it is ended as too
    # slow, and subscribers per process
    subscriber_queue_size: int = 1000
    max_subscribers: int = 5000
    # limits on one request
    max_rating_groups_per_request: int = 64
    max_session_id_bytes: int = 256
    max_account_id_bytes: int = 128
    max_message_bytes: int = 64 * 1024
    # calls (unary, streams and subscriptions) one process serves at once; past it
    # RESOURCE_EXHAUSTED
    max_concurrent_calls: int = 10_000
    # how long one Redis call may take before the request fails with UNABLE_TO_COMPLY
    redis_call_timeout_s: float = 2.0
    # Redis connections per server process
    redis_max_connections: int = 32
    # requests of one Charging.Stream worked on at once (then the stream is not read)
    max_in_flight_per_stream: int = 256
    # grace given to calls in flight when the server stops
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        positive = (
            "answer_retention_s", "partitions", "events_max_length", "spike_fast_window_s",
            "spike_slow_window_s", "subscriber_queue_size", "max_subscribers",
            "supervision_factor", "supervision_interval_s", "supervision_batch",
            "max_in_flight_per_stream", "max_concurrent_calls",
            "max_rating_groups_per_request", "max_session_id_bytes",
            "max_account_id_bytes", "max_message_bytes", "redis_call_timeout_s",
            "redis_max_connections",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name}: must be greater than 0")
        for name in ("shutdown_grace_s", "events_retention_s", "spike_factor", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name}: must be 0 or more")
        if self.spike_fast_window_s >= self.spike_slow_window_s:
            raise ValueError("setting spike_fast_window_s: must be shorter than "
                             "spike_slow_window_s")
        if ":" not in self.listen_address:
            raise ValueError(f"setting listen_address: {self.listen_address!r} is not host:port")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _parser_of(default: object) -> Callable[[str], object]:
    return _parse_bool if isinstance(default, bool) else type(default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting; each defaults to CREDITLINE_<NAME> from the environment."""
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, dest=f.name, type=_parser_of(f.default), default=None,
            help=f"(env {ENV_PREFIX}{f.name.upper()}; default {f.default!r})",
        )


def from_arguments(
    namespace: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> Settings:
    values: dict[str, object] = {}
    for f in fields(Settings):
        flag_value = getattr(namespace, f.name, None)
        env_value = environ.get(ENV_PREFIX + f.name.upper())
        kind = _parser_of(f.default)
        if flag_value is not None:
            values[f.name] = flag_value
        elif env_value is not None:
            try:
                values[f.name] = kind(env_value)
            except ValueError:
                expected = type(f.default).__name__
                raise ValueError(f"environment {ENV_PREFIX}{f.name.upper()}: "
                                 f"{env_value!r} is not a {expected}") from None
    return Settings(**values)  # type: ignore[arg-type]


def parse(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Settings:
    parser = argparse.ArgumentParser(prog="creditline serve")
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv), environ)
